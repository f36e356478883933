"""Attention implementations against the reference path, and which one each backend gets.

The "cudnn" path is checked on the CPU by running its very call (is_causal, key lengths, folded
scale) with implementation="xla"; the kernel itself is checked by the GPU-only test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models import decode_in_steps, dropout_key, gpt2_config, roberta_config

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
    ("tpu", "bfloat16", "auto", "xla"),
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
