"""Attention implementations against the reference path, which one each backend gets, and the
fallback to XLA's where a fast kernel fails.

The "cudnn" path is checked on the CPU by running its very call (is_causal, key lengths, folded
scale) with implementation="xla"; the kernel itself is checked by the GPU-only test. The "splash"
kernel runs on the CPU in Pallas' interpreter (the very kernel, its block masks and segment ids);
tests/test_plan.py compiles it for TPU topologies."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models import decode_in_steps, dropout_key, gpt2_config, roberta_config
from test_resume import run_argv, run_in_process

from flax_lm import backend
from flax_lm.models import attention, create_model
from flax_lm.models.errors import ModelError
from flax_lm.models.gpt2 import GPT2LMHeadModel
from flax_lm.models.roberta import RobertaForMaskedLM

# Difference from the reference allowed, (absolute, relative), per compute dtype (outputs and
# gradients up to ~6). float32: rounding only. bfloat16: a unit or two in the last place, as the
# paths round the probabilities to bfloat16 at different points.
TOLERANCE = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2e-2, 1.6e-2)}
LENGTH, BLOCK = 32, 8  # the reference's causal path then runs in 4 query blocks


@pytest.fixture
def cudnn_call_on_xla(monkeypatch):
    monkeypatch.setattr(attention, "CUDNN_BACKEND", "xla")
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", BLOCK)


def inputs(dtype, length=LENGTH, heads=4, head_dim=16):
    """q, k, v [3, length, heads, head_dim] and a right-padding mask: full, padded, all padding."""
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (3, length, heads, head_dim)).astype(dtype) for key in keys)
    padding = np.ones((3, length), np.int32)
    padding[1, length - 11:] = 0
    padding[2] = 0
    return q, k, v, jnp.asarray(padding)


def output_and_grads(implementation, q, k, v, mask, *, causal, scale=0.25, rate=0.0, key=None):
    def f(q, k, v):
        return attention.attend(implementation, q, k, v, mask, scale=scale, causal=causal,
                                dropout_rate=rate, dropout_key=key)

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(jnp.cos(out.astype(jnp.float32)).astype(out.dtype))

    return run(q, k, v)


def assert_close(got, want, dtype, rows=slice(0, 2)):
    """Equal within TOLERANCE on the rows with a real key; finite everywhere."""
    atol, rtol = TOLERANCE[dtype]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a[rows], b[rows], atol=atol, rtol=rtol)


@pytest.mark.parametrize("implementation, causal, dtype", [
    ("xla", True, jnp.float32),
    ("xla", False, jnp.bfloat16),
    ("cudnn", True, jnp.bfloat16),
    ("cudnn", False, jnp.float32),
])
def test_implementations_equal_the_reference(cudnn_call_on_xla, implementation, causal, dtype):
    """Outputs and q/k/v gradients on a padded batch, for every row with a real key (a fully
    padded row only has to stay finite: its outputs are never used)."""
    q, k, v, padding = inputs(dtype)
    mask = attention.self_attention_mask(padding, LENGTH, causal=causal)
    want = output_and_grads("reference", q, k, v, mask, causal=causal)
    got = output_and_grads(implementation, q, k, v, mask, causal=causal)
    assert got[0].dtype == want[0].dtype == dtype
    assert_close(got, want, dtype)


def test_a_traced_scale_is_folded_into_the_queries(cudnn_call_on_xla):
    """GPT-2's scale_attn_by_inverse_layer_idx gives a traced scale; the fused call needs a
    constant one."""
    q, k, v, padding = inputs(jnp.float32)
    mask = attention.self_attention_mask(padding, LENGTH, causal=True)
    scale = jnp.float32(0.25) / 3
    want = output_and_grads("reference", q, k, v, mask, causal=True, scale=scale)
    got = output_and_grads("cudnn", q, k, v, mask, causal=True, scale=scale)
    assert_close(got, want, jnp.float32)


def test_attention_dropout_takes_the_reference_path(cudnn_call_on_xla):
    """With a dropout key and rate, a fused implementation drops exactly the reference's
    entries: it is the reference path."""
    q, k, v, padding = inputs(jnp.float32)
    mask = attention.self_attention_mask(padding, LENGTH, causal=True)
    options = dict(causal=True, rate=0.2, key=dropout_key(5))
    want = output_and_grads("reference", q, k, v, mask, **options)
    got = output_and_grads("cudnn", q, k, v, mask, **options)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("platform, dtype, requested, chosen", [
    ("cpu", "float32", "auto", "reference"),
    ("cpu", "bfloat16", "auto", "reference"),
    ("cuda", "bfloat16", "auto", "cudnn"),
    ("gpu", "bfloat16", "auto", "cudnn"),
    ("cuda", "float32", "auto", "xla"),
    ("rocm", "bfloat16", "auto", "xla"),
    ("tpu", "bfloat16", "auto", "splash"),  # TPU v4 and later
    ("tpu", "float32", "auto", "splash"),
    ("tpu_v3", "bfloat16", "auto", "xla"),
    ("tpu_v2", "float32", "auto", "xla"),
    ("tpu", "float32", "reference", "reference"),
    ("cuda", "bfloat16", "xla", "xla"),
    ("cpu", "float32", "xla", "xla"),
])
def test_the_implementation_is_chosen_by_platform_and_dtype(platform, dtype, requested, chosen):
    assert attention.choose_attention(platform, jnp.dtype(dtype), requested) == chosen


@pytest.mark.parametrize("platform, dtype, requested, named", [
    ("cpu", "bfloat16", "cudnn", "cpu"),
    ("cuda", "float32", "cudnn", "float32"),
    ("cuda", "bfloat16", "flash", "flash"),
    ("tpu_v3", "bfloat16", "splash", "v4"),
    ("cuda", "bfloat16", "splash", "cuda"),
])
def test_impossible_choices_are_user_errors(platform, dtype, requested, named):
    with pytest.raises(ModelError, match=named):
        attention.choose_attention(platform, jnp.dtype(dtype), requested)


def test_models_take_the_chosen_implementation():
    """create_model injects this backend's platform: the CPU keeps the reference path."""
    def built(config, **options):
        return nnx.eval_shape(lambda: create_model(config, **options))

    assert built(gpt2_config(), attention="auto").h.attn.implementation == "reference"
    assert built(roberta_config(), attention="xla").layers.attention.implementation == "xla"
    with pytest.raises(ModelError, match="cudnn"):
        built(gpt2_config(), attention="cudnn", dtype="bfloat16")
    # A model built for another platform's devices (a plan compiling for a GPU on this CPU) takes
    # that platform's choice, and a named one is checked against it.
    fused = built(gpt2_config(), dtype="bfloat16", platform="cuda")
    assert fused.h.attn.implementation == "cudnn"
    # ... and its loss's gradient (flax_lm/backend.py fused_loss): hand-made off the CPU
    assert fused.fused_loss and not built(gpt2_config()).fused_loss
    assert built(roberta_config(), attention="cudnn", dtype="bfloat16",
                 platform="cuda").layers.attention.implementation == "cudnn"
    with pytest.raises(ModelError, match="tpu"):
        built(gpt2_config(), attention="cudnn", dtype="bfloat16", platform="tpu")


def padded_ids(config, pad_id):
    ids = np.random.RandomState(2).randint(3, config.vocab_size, (3, 12))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2] = 0
    return np.where(mask == 1, ids, pad_id), mask


def loss_and_grads(model, ids, mask):
    graphdef, params = nnx.split(model)

    def loss(params):
        logits = nnx.merge(graphdef, params)(ids, mask)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1)[..., 0]
        return -(picked * mask).sum()

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("model_class, make_config", [
    (GPT2LMHeadModel, lambda: gpt2_config(n_layer=1, scale_attn_by_inverse_layer_idx=True)),
    (RobertaForMaskedLM, lambda: roberta_config(num_hidden_layers=1)),
])
def test_models_on_the_fused_path_equal_the_reference(cudnn_call_on_xla, model_class,
                                                      make_config):
    """Loss and every parameter gradient of a padded batch, float32: the masks the models
    build for the fused call (causal, key lengths) are the reference's."""
    config = make_config()
    ids, mask = padded_ids(config, config.pad_token_id or 0)
    want_loss, want_grads = loss_and_grads(model_class(config, attention="reference"), ids, mask)
    loss, grads = loss_and_grads(model_class(config, attention="cudnn"), ids, mask)
    assert abs(float(loss - want_loss)) <= 1e-5 * abs(float(want_loss))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_works_with_a_fused_model(cudnn_call_on_xla):
    """Decoding against a cache takes the reference path; it equals the fused full forward."""
    model = GPT2LMHeadModel(gpt2_config(), attention="cudnn")
    ids = np.random.RandomState(4).randint(3, model.config.vocab_size, (2, 12))
    full = nnx.jit(lambda m, i: m(i))(model, ids)
    np.testing.assert_allclose(decode_in_steps(model, ids, prefill=5), full, atol=1e-4, rtol=0)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN's fused attention runs only on an NVIDIA GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_kernel_equals_the_reference_on_a_gpu(causal):
    """The real kernel (bfloat16, GPT-2's head size 64, 512 positions, right padding)."""
    q, k, v, padding = inputs(jnp.bfloat16, length=512, heads=4, head_dim=64)
    mask = attention.self_attention_mask(padding, 512, causal=causal)
    want = output_and_grads("reference", q, k, v, mask, causal=causal, scale=0.125)
    got = output_and_grads("cudnn", q, k, v, mask, causal=causal, scale=0.125)
    assert_close(got, want, jnp.bfloat16)


# ------------------------------------------------------------------------- splash attention

SPLASH_LENGTH = attention.SPLASH_BLOCK  # the shortest sequence the kernel takes


@pytest.fixture
def splash_interpreted(monkeypatch):
    """The splash kernel as Pallas' interpreter runs it on this CPU."""
    monkeypatch.setitem(attention.KERNELS, "splash",
                        functools.partial(attention.splash_attention, interpret=True))


def output_and_real_grads(implementation, q, k, v, padding, *, causal, scale=0.25):
    """Output and q/k/v gradients of a loss on the real (unpadded) positions only: what a
    model's loss sees. (Splash's padding queries attend padding keys, the reference's attend the
    real ones: outputs that no loss reads.)"""
    mask = attention.self_attention_mask(padding, q.shape[1], causal=causal)
    real = padding.astype(bool)[:, :, None, None]

    def f(q, k, v):
        y = attention.attend(implementation, q, k, v, mask, scale=scale, causal=causal,
                             dropout_rate=0.0, dropout_key=None)
        return jnp.where(real, y, 0)

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(jnp.cos(out.astype(jnp.float32)).astype(out.dtype))

    return run(q, k, v)


@pytest.mark.parametrize("causal, dtype", [(True, jnp.float32), (False, jnp.bfloat16)])
def test_splash_kernel_equals_the_reference_interpreted(splash_interpreted, causal, dtype):
    """Pallas' splash kernel itself (block masks, segment ids from the key lengths, the scale
    folded into the queries), forward and gradients, on a full and a right-padded row."""
    q, k, v, padding = inputs(dtype, length=SPLASH_LENGTH, heads=2, head_dim=16)
    want = output_and_real_grads("reference", q, k, v, padding, causal=causal)
    got = output_and_real_grads("splash", q, k, v, padding, causal=causal)
    assert got[0].dtype == dtype
    assert_close(got, want, dtype)
    # the padded row's gradient reaches no padding key: nothing leaks across the padding
    assert not np.asarray(got[1][1][1, SPLASH_LENGTH - 11:], np.float32).any()


def test_a_gpt2_model_on_splash_equals_the_reference(splash_interpreted):
    """Loss and every gradient of a padded batch through a whole model (GPT-2's traced
    per-layer scale included)."""
    config = gpt2_config(n_layer=1, n_positions=SPLASH_LENGTH,
                         scale_attn_by_inverse_layer_idx=True)
    ids = np.random.RandomState(2).randint(3, config.vocab_size, (2, SPLASH_LENGTH))
    mask = np.ones_like(ids)
    mask[1, 90:] = 0
    want_loss, want_grads = loss_and_grads(GPT2LMHeadModel(config, attention="reference"), ids,
                                           mask)
    loss, grads = loss_and_grads(GPT2LMHeadModel(config, attention="splash"), ids, mask)
    assert abs(float(loss - want_loss)) <= 1e-5 * abs(float(want_loss))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------- fallback

GEOMETRY = dict(heads=2, head_dim=16, length=LENGTH, causal=True, dtype=jnp.float32,
                attn_dropout=0.0)


def failing_kernel(*args, **kwargs):
    raise RuntimeError("CUDNN_STATUS_EXECUTION_FAILED (injected)")


def kernel_without_causal_mask(q, k, v, mask, *, scale, causal):
    """A wrong fast kernel: it lets queries see later tokens (a speed-up and a lower loss)."""
    return attention.xla_attention(q, k, v, mask._replace(dense=None), scale=scale, causal=False)


def test_a_fast_kernel_that_fails_or_errs_gives_way_to_xla(monkeypatch):
    chosen = attention.attention_choice("cuda", jnp.bfloat16)
    assert chosen.implementation == "cudnn" and "cuda" in chosen.reason
    monkeypatch.setitem(attention.KERNELS, "cudnn", failing_kernel)
    settled = attention.settle_attention(chosen, **GEOMETRY)
    assert settled.implementation == "xla"
    assert "cudnn" in settled.reason and "CUDNN_STATUS_EXECUTION_FAILED" in settled.reason
    monkeypatch.setitem(attention.KERNELS, "cudnn", kernel_without_causal_mask)
    settled = attention.settle_attention(chosen, **GEOMETRY)
    assert settled.implementation == "xla" and "differs from the reference" in settled.reason
    # named by the user: not replaced, one clear error
    with pytest.raises(ModelError, match="cudnn"):
        attention.settle_attention(attention.attention_choice("cuda", jnp.bfloat16, "cudnn"),
                                   **GEOMETRY)


def test_a_kernel_that_works_is_kept_and_dropout_says_why_it_is_unfused(monkeypatch):
    monkeypatch.setattr(attention, "CUDNN_BACKEND", "xla")  # the cuDNN call, run by XLA
    chosen = attention.attention_choice("cuda", jnp.float32, "auto")._replace(
        implementation="cudnn")
    kept = attention.settle_attention(chosen, **{**GEOMETRY, "attn_dropout": 0.1})
    assert kept.implementation == "cudnn" and "dropout 0.1" in kept.reason
    assert "reference" in kept.reason
    # splash takes whole blocks: another length is XLA's, without trying the kernel
    splash = attention.attention_choice("tpu", jnp.bfloat16)
    settled = attention.settle_attention(splash, **GEOMETRY, try_kernel=False)
    assert settled.implementation == "xla" and str(attention.SPLASH_BLOCK) in settled.reason
    # and the real splash kernel cannot run on a CPU outside the interpreter: a real failure
    assert attention.kernel_problem("splash", heads=2, head_dim=16, length=SPLASH_LENGTH,
                                    causal=True, dtype=jnp.float32) is not None


def test_a_training_run_whose_fast_kernel_fails_says_so_and_trains_on_xla(
    code_corpus, tiny_tokenizer_dir, tmp_path, monkeypatch
):
    """A CPU made to choose cuDNN's kernel, which fails as a cuDNN/CUDA mismatch would: the run
    says so in one line, trains with XLA's attention, and its metrics.jsonl header says why."""
    cpu = dataclasses.replace(backend.BACKENDS["cpu"], attention="cudnn", fused_attention="cudnn")
    monkeypatch.setitem(backend.BACKENDS, "cpu", cpu)
    monkeypatch.setitem(attention.KERNELS, "cudnn", failing_kernel)
    out = tmp_path / "run"
    argv = [*run_argv("clm", code_corpus, tiny_tokenizer_dir, out, tmp_path / "cache"),
            "--max_steps", "2", "--save_steps", "2", "--eval_steps", "2"]
    stdout, _ = run_in_process(argv, "clm")
    said = [line for line in stdout.splitlines() if line.startswith("attention:")]
    assert len(said) == 1 and "xla" in said[0] and "CUDNN_STATUS_EXECUTION_FAILED" in said[0]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    header = records[0]["header"]
    assert header["attention"] == "xla" and "cudnn" in header["attention_reason"]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
