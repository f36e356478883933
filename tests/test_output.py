"""The output layer's chunked cross-entropy (flax_lm/models/output.py) against the loss of the
whole logits (objectives.token_cross_entropy): sums, correctness and gradients, float32 and
bfloat16, one chunk, several, and a padded last one; and the objectives built on it."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import host_devices
from flax import nnx
from transformers import GPT2Config

from flax_lm.models import create_model
from flax_lm.models import output as output_module
from flax_lm.models.output import IGNORE_INDEX, OutputLayer, chunk_length, cross_entropy_sums
from flax_lm.train.objectives import CausalLM, KeytokenWeightedCLM, token_cross_entropy

BATCH, SEQ, WIDTH, VOCAB = 3, 24, 16, 40
# float32 agrees to rounding; bfloat16 rounds the logits' gradient before the matmuls (both
# paths do), in a different order of operations
TOLERANCES = {"float32": {"rtol": 1e-5, "atol": 1e-6}, "bfloat16": {"rtol": 2e-2, "atol": 2e-3}}


def whole_logits_loss(output: OutputLayer, labels, weights):
    losses, _, is_correct = token_cross_entropy(output.logits(), labels)
    return (weights * losses).sum(), is_correct


def example(dtype: str, seed: int = 0):
    """Features, table, bias, labels (some not targets, a third the logits' argmax, so the
    correct count is neither 0 nor everything) and weights of the targets."""
    rng = np.random.default_rng(seed)
    features = jnp.asarray(rng.normal(size=(BATCH, SEQ, WIDTH)), dtype)
    table = jnp.asarray(rng.normal(size=(VOCAB, WIDTH)) * 0.5, jnp.float32)
    bias = jnp.asarray(rng.normal(size=VOCAB) * 0.1, jnp.float32)
    best = np.asarray(OutputLayer(features, table, bias).logits().argmax(-1))
    labels = np.where(rng.random((BATCH, SEQ)) < 0.33, best, rng.integers(0, VOCAB, (BATCH, SEQ)))
    labels = np.where(rng.random((BATCH, SEQ)) < 0.2, IGNORE_INDEX, labels).astype(np.int32)
    weights = np.where(labels != IGNORE_INDEX, rng.uniform(0.5, 2.0, (BATCH, SEQ)), 0.0)
    return features, table, bias, jnp.asarray(labels), jnp.asarray(weights, jnp.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk, fused", [(SEQ, False), (SEQ, True), (8, False), (8, True),
                                          (16, False)],
                         ids=["one-chunk", "one-chunk-fused", "three-chunks",
                              "three-chunks-fused", "padded"])
def test_chunked_loss_and_gradients_equal_the_whole_logits(monkeypatch, dtype, chunk, fused):
    """Chunked (and, with `fused`, one chunk through the hand-made gradient too, as off-CPU
    backends take it) against autodiff of the whole logits. `fused` also pads the vocabulary
    (40) to VOCAB_MULTIPLE inside, which must change nothing."""
    monkeypatch.setattr(output_module, "LOGITS_PER_CHUNK_ROW", chunk * VOCAB)
    assert chunk_length(SEQ, VOCAB) == chunk
    features, table, bias, labels, weights = example(dtype)

    def loss(fn):
        def of(features, table, bias):
            total, is_correct = fn(OutputLayer(features, table, bias, fused=fused), labels,
                                   weights)
            return total, is_correct
        return jax.jit(jax.value_and_grad(of, argnums=(0, 1, 2), has_aux=True))

    (want, want_correct), want_grads = loss(whole_logits_loss)(features, table, bias)
    (got, got_correct), got_grads = loss(cross_entropy_sums)(features, table, bias)
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == "float32" else 1e-5)
    np.testing.assert_array_equal(got_correct, want_correct)
    assert 0 < int(got_correct.sum()) < int((labels != IGNORE_INDEX).sum())
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        assert got_grad.dtype == want_grad.dtype
        scale = float(jnp.abs(want_grad.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(got_grad, np.float32) / scale,
                                   np.asarray(want_grad, np.float32) / scale, **TOLERANCES[dtype])

    # evaluation (no gradient) takes the forward-only pass: the same sums
    evaluated, evaluated_correct = jax.jit(cross_entropy_sums)(
        OutputLayer(features, table, bias, fused=fused), labels, weights)
    np.testing.assert_allclose(evaluated, got, rtol=1e-6)
    np.testing.assert_array_equal(evaluated_correct, got_correct)


def test_one_pass_maximum_and_sum_of_exponentials():
    """The fused loss's online softmax reduction against the two-pass one: the maximum exact,
    the sum to rounding, also in rows led by, or made almost only of, the vocabulary padding
    (the lowest float), whose padding-only partial results merge first."""
    rng = np.random.default_rng(0)
    lowest = np.finfo(np.float32).min
    rows = rng.normal(size=(6, 300)).astype(np.float32) * 4.0
    rows[1, :200] = lowest  # padding first, then logits
    rows[2, 1:] = lowest  # one logit
    rows[3] = 0.0  # a position that is no target: zeroed logits
    rows[4, ::2] = lowest  # padding and logits interleaved
    rows[5, 100:] = 60.0  # ties at a large maximum
    maximum, sum_exp = jax.jit(output_module._max_and_sum_exp)(jnp.asarray(rows))
    np.testing.assert_array_equal(maximum, rows.max(axis=1))
    want = np.exp(rows.astype(np.float64) - rows.max(axis=1, keepdims=True)).sum(axis=1)
    np.testing.assert_allclose(sum_exp, want, rtol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["cpu-loss", "fused-loss"])
def test_garbage_in_positions_that_are_no_targets_reaches_neither_sum_nor_count(monkeypatch,
                                                                                 fused):
    monkeypatch.setattr(output_module, "LOGITS_PER_CHUNK_ROW", 8 * VOCAB)
    features, table, bias, labels, weights = example("float32")
    garbage = features.at[0, :5].set(jnp.nan).at[1, 3].set(jnp.inf)
    labels = labels.at[0, :5].set(IGNORE_INDEX).at[1, 3].set(IGNORE_INDEX)
    weights = jnp.where(labels == IGNORE_INDEX, 0.0, weights)
    clean = cross_entropy_sums(OutputLayer(features, table, bias, fused=fused), labels, weights)
    dirty = cross_entropy_sums(OutputLayer(garbage, table, bias, fused=fused), labels, weights)
    np.testing.assert_allclose(dirty[0], clean[0], rtol=1e-6)
    np.testing.assert_array_equal(dirty[1], clean[1])
    d_features = jax.grad(lambda f: cross_entropy_sums(
        OutputLayer(f, table, bias, fused=fused), labels, weights)[0])(garbage)
    assert np.isfinite(np.asarray(d_features)).all()


def test_chunks_hold_a_bounded_share_of_the_vocabulary_logits():
    assert chunk_length(512, 8192) == 512  # 4M logits a row: the whole row, no loop
    assert chunk_length(512, 50257) == 64  # GPT-2: 8 chunks of 64 positions
    assert chunk_length(100, 50257) == 64  # a padded last chunk
    assert chunk_length(512, 2**23) == output_module.MIN_CHUNK
    # the MLM head's fallback over every position: chunks no larger than its usual 48 targets
    assert chunk_length(128, 37902, most=48) == 32
    assert chunk_length(40, 8192, most=48) == 40


def test_gpt2_objectives_match_the_loss_of_its_logits(monkeypatch):
    """CausalLM and the key-token weighted loss through the chunked output layer equal their
    `loss_terms` of the model's whole logits (the reference), with gradients (float32; the
    bfloat16 rounding is checked on the output layer alone above)."""
    monkeypatch.setattr(output_module, "LOGITS_PER_CHUNK_ROW", 8 * 96)  # 8 chunks of 8
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    graphdef, state = nnx.split(create_model(config, 0))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 96, (2, 64)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 41:] = 0
    for objective in (CausalLM(), KeytokenWeightedCLM(keytoken_ids=(3, 5, 7), alpha=2.0)):
        batch = {k: jnp.asarray(v) for k, v in
                 objective.make_batch({"input_ids": ids, "attention_mask": mask}, rng).items()}

        def reference(state, objective=objective, batch=batch):
            model = nnx.merge(graphdef, state)
            terms = objective.loss_terms(model(batch["input_ids"], batch["attention_mask"]),
                                         batch)
            return terms["loss_sum"], terms

        def chunked(state, objective=objective, batch=batch):
            terms = objective.terms(nnx.merge(graphdef, state), batch)
            return terms["loss_sum"], terms

        (_, want), want_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(state)
        (_, got), got_grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(state)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5)
        for got_grad, want_grad in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads),
                                       strict=True):
            scale = float(jnp.abs(want_grad).max())
            np.testing.assert_allclose(got_grad / scale, want_grad / scale,
                                       **TOLERANCES["float32"])


SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from flax.linen import logical_axis_rules
from transformers import GPT2Config
from flax_lm.models import create_model, output
from flax_lm.train.objectives import CausalLM
from flax_lm.train.step import LOGICAL_AXIS_RULES, batch_sharding, make_mesh, state_sharding

output.LOGITS_PER_CHUNK_ROW = 16 * 128  # 4 chunks of 16 positions
config = GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                    bos_token_id=0, eos_token_id=0)
graphdef, params = nnx.split(create_model(config, 0), nnx.Param)
ids = np.random.default_rng(0).integers(0, 128, (8, 64)).astype(np.int32)
batch = {k: jnp.asarray(v) for k, v in CausalLM().make_batch({"input_ids": ids}, None).items()}

def loss(params, batch):
    terms = CausalLM().terms(nnx.merge(graphdef, params), batch)
    return terms["loss_sum"], terms

step = jax.value_and_grad(loss, has_aux=True)
(_, want), want_grads = jax.jit(step)(params, batch)
mesh = make_mesh(jax.devices(), "data=2,fsdp=4")
shardings = (state_sharding(mesh, params), {k: batch_sharding(mesh, 2) for k in batch})
with jax.set_mesh(mesh), logical_axis_rules(LOGICAL_AXIS_RULES):
    sharded = jax.jit(step, in_shardings=shardings)
    (_, got), got_grads = sharded(*jax.device_put((params, batch), shardings))
table = got_grads["wte"]["embedding"]
assert len(table.sharding.device_set) == 8, table.sharding
for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5)
for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(np.abs(w).max()))
print("same on data=2,fsdp=4")
"""


@pytest.mark.slow
def test_the_chunked_loss_is_the_same_with_fsdp_on_eight_devices():
    """The chunk loop's gradient carry of the (FSDP-sharded) table, and the batch split over
    both mesh axes, give one device's loss and gradients."""
    env = {**os.environ, **host_devices(8)}
    done = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same on data=2,fsdp=4" in done.stdout
