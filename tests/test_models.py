"""Flax NNX GPT-2 / RoBERTa against transformers' PyTorch models, on tiny random configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import raises_user_error
from flax import nnx
from transformers import GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForMaskedLM
from transformers.activations import ACT2FN

from flax_lm.models import (
    SUPPORTED_MODEL_TYPES,
    attention,
    create_model,
    layers,
    matmul_param_count,
    weight_decay_mask,
)
from flax_lm.models.hf_io import import_state_dict
from flax_lm.models.layers import (
    ACTIVATIONS,
    REMAT_POLICIES,
    Bias,
    Embedding,
    LayerNormParam,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB, PAD = 300, 1
LOGITS_TOL = 1e-4  # float32 logits vs PyTorch (measured <= 2.4e-7)
LOSS_TOL = 1e-5  # float32 mean cross-entropy vs PyTorch (measured <= 4.3e-7)


def gpt2_config(**overrides) -> GPT2Config:
    fields = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                  bos_token_id=0, eos_token_id=0)
    return GPT2Config(**{**fields, **overrides})


def roberta_config(**overrides) -> RobertaConfig:
    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=40,
                  pad_token_id=PAD, bos_token_id=0, eos_token_id=2)
    return RobertaConfig(**{**fields, **overrides})


TORCH_CLASSES = {"gpt2": GPT2LMHeadModel, "roberta": RobertaForMaskedLM}


def torch_model(config, attn_implementation: str = "eager", seed: int = 0):
    """A PyTorch model in eval mode with non-trivial LayerNorm and bias values."""
    torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    model = TORCH_CLASSES[config.model_type](config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # biases and LayerNorm weights start at 0 / 1
                param.add_(0.1 * torch.randn_like(param))
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy() for name, t in model.state_dict().items()}


def padded_batch(config) -> tuple[np.ndarray, np.ndarray]:
    """Four sequences of 12 tokens: full, right-padded twice, and all padding (a row with
    every key masked must not give NaN). Pad id where the mask is 0."""
    ids = np.random.RandomState(1).randint(3, VOCAB, (4, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    mask[3, :] = 0
    ids[mask == 0] = config.pad_token_id if config.pad_token_id is not None else 0
    return ids, mask


def mlm_labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """-100 everywhere but every third real token."""
    labels = np.full_like(ids, -100)
    chosen = (np.arange(ids.shape[1]) % 3 == 0)[None] & (mask == 1)
    labels[chosen] = ids[chosen]
    return labels


def mean_ce(logits, labels: np.ndarray) -> float:
    """Mean cross-entropy over labels != -100 (transformers' convention), in float64 numpy."""
    logits = np.asarray(logits, np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    keep = labels != -100
    picked = np.take_along_axis(log_probs, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    return float(-(picked * keep).sum() / keep.sum())


def dropout_key(seed: int) -> jax.Array:
    """A dropout key. The model works with any key implementation; "unsafe_rbg" compiles in a
    fraction of threefry's time on CPU, which keeps these tests fast."""
    return jax.random.key(seed, impl="unsafe_rbg")


@nnx.jit
def forward(model, ids, mask=None, dropout_rng=None):
    """The model's logits, compiled once per config and shapes (tests share the cache)."""
    return model(ids, mask, dropout_rng=dropout_rng)


def ours_and_torch_loss(ours, reference, ids, mask) -> tuple[float, float]:
    """Our loss and PyTorch's: CLM labels = ids with padding ignored, shifted by one as
    transformers does; MLM labels from `mlm_labels`."""
    if ours.config.model_type == "gpt2":
        labels = np.where(mask == 1, ids, -100)
        ours_loss = mean_ce(forward(ours, ids, mask)[:, :-1], labels[:, 1:])
    else:
        labels = mlm_labels(ids, mask)
        ours_loss = mean_ce(forward(ours, ids, mask), labels)
    with torch.no_grad():
        out = reference(torch.tensor(ids), attention_mask=torch.tensor(mask),
                        labels=torch.tensor(labels))
    return ours_loss, float(out.loss)


def assert_logits_match(ours, reference, ids, mask, tol=LOGITS_TOL) -> None:
    with torch.no_grad():
        expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(forward(ours, ids, mask))
    assert got.dtype == np.float32 and got.shape == expected.shape
    keep = mask.astype(bool)
    assert np.isfinite(got).all()
    assert np.abs(got - expected)[keep].max() <= tol


def imported(config, reference, **options):
    return import_state_dict(create_model(config, **options), state_dict_numpy(reference))


@pytest.fixture(scope="module")
def gpt2_pair():
    """(ours, PyTorch) GPT-2 with the same random weights."""
    reference = torch_model(gpt2_config())
    return imported(reference.config, reference), reference


@pytest.fixture(scope="module")
def roberta_pair():
    reference = torch_model(roberta_config())
    return imported(reference.config, reference), reference


PARITY_CONFIGS = {
    "gpt2": gpt2_config,
    "roberta": roberta_config,
    # every field that changes GPT-2's computation, away from its default
    "gpt2-variant": lambda: gpt2_config(
        activation_function="relu", n_inner=96, layer_norm_epsilon=1e-3,
        scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True,
        tie_word_embeddings=False),
    "roberta-variant": lambda: roberta_config(
        hidden_act="gelu_new", pad_token_id=0, type_vocab_size=1, layer_norm_eps=1e-3,
        tie_word_embeddings=False),
}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_logits_and_loss_match_transformers(name, attn_implementation):
    config = PARITY_CONFIGS[name]()
    reference = torch_model(config, attn_implementation)
    ours = imported(config, reference)
    ids, mask = padded_batch(config)
    assert_logits_match(ours, reference, ids, mask)
    ours_loss, torch_loss = ours_and_torch_loss(ours, reference, ids, mask)
    assert abs(ours_loss - torch_loss) <= LOSS_TOL


@pytest.mark.parametrize("make_config", [gpt2_config, roberta_config])
def test_scanned_and_unrolled_layers_agree(make_config):
    config = make_config()
    ids, mask = padded_batch(config)
    np.testing.assert_allclose(forward(create_model(config), ids, mask),
                               forward(create_model(config, scan_layers=False), ids, mask),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "roberta", "roberta-variant"])
def test_unrolled_layers_recompute_the_activation_to_the_same_gradients(name):
    """Unrolled, the MLP recomputes its activation (GELU tanh or erf) in the backward pass
    (layers.recomputed_activation); scanned, autodiff keeps its terms: same loss and gradients."""
    config = PARITY_CONFIGS[name]()
    ids, mask = padded_batch(config)
    results = {}
    for scan in (True, False):
        model = create_model(config, scan_layers=scan)
        mlp = (model.h if config.model_type == "gpt2" else model.layers).mlp
        assert mlp.recompute_activation is not scan
        graphdef, params = nnx.split(model)
        results[scan] = jax.jit(jax.value_and_grad(masked_loss(graphdef, ids, mask)))(params)
    (scanned_loss, scanned_grads), (unrolled_loss, unrolled_grads) = results[True], results[False]
    assert abs(float(scanned_loss - unrolled_loss)) <= 1e-5
    for a, b in zip(jax.tree.leaves(scanned_grads), jax.tree.leaves(unrolled_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_scanned_and_unrolled_layers_draw_the_same_dropout():
    config = gpt2_config()
    ids, mask = padded_batch(config)
    key = dropout_key(3)
    np.testing.assert_allclose(forward(create_model(config), ids, mask, key),
                               forward(create_model(config, scan_layers=False), ids, mask, key),
                               atol=1e-5, rtol=0)


def masked_loss(graphdef, ids, mask):
    def loss(params):
        ce = optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, params)(ids), ids)
        return jnp.sum(ce * mask) / jnp.sum(mask)

    return loss


def test_remat_keeps_fewer_activations_for_the_backward_pass():
    """The residuals the backward pass holds (bytes, from abstract shapes): remat "full" keeps
    the least; "qkv_out" and "mlp" add the activations they name (4 and 5 widths a token and
    layer here, float32); "dots" every projection's output; no remat everything."""
    config = gpt2_config()
    ids, mask = padded_batch(config)
    saved = {}
    for remat in (None, *REMAT_POLICIES):
        graphdef, params = nnx.split(create_model(config, remat=remat))
        loss = masked_loss(graphdef, ids, mask)
        residuals = jax.eval_shape(lambda p, loss=loss: jax.tree.leaves(jax.vjp(loss, p)[1]),
                                   params)
        saved[remat] = sum(r.size * r.dtype.itemsize for r in residuals)
    activation = config.n_layer * ids.size * config.n_embd * 4  # one width, every token and layer
    # (within 3%: keeping a projection's output can spare a small residual "full" keeps)
    assert saved["qkv_out"] - saved["full"] == pytest.approx(4 * activation, rel=0.03)
    assert saved["mlp"] - saved["full"] == pytest.approx(5 * activation, rel=0.03)
    assert saved["mlp"] < saved["dots"] < saved[None]


def test_gradients_agree_with_rematerialised_layers():
    """Every remat policy only changes what is recomputed: same loss and gradients as none."""
    config = gpt2_config()
    ids, mask = padded_batch(config)

    def loss_and_grads(remat):
        graphdef, params = nnx.split(create_model(config, remat=remat))
        return jax.jit(jax.value_and_grad(masked_loss(graphdef, ids, mask)))(params)

    loss, grads = loss_and_grads(None)
    for remat in REMAT_POLICIES:
        other_loss, other_grads = loss_and_grads(remat)
        assert abs(float(loss - other_loss)) <= 1e-6, remat
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=remat)


@nnx.jit
def decode(model, ids, cache, mask=None, positions=None):
    return model.decode(ids, cache, attention_mask=mask, position_ids=positions)


def decode_in_steps(model, ids, prefill: int, mask=None, positions=None):
    """Logits of a prefill of `prefill` tokens, then one token at a time (one compiled step)."""
    cache = model.init_cache(batch_size=ids.shape[0], max_length=ids.shape[1] + 3)
    if mask is not None:  # the cache's mask: the prompt's, then ones for the tokens to come
        mask = np.pad(mask, ((0, 0), (0, 3)), constant_values=1)
    chunks = []
    for start, stop in [(0, prefill), *((t, t + 1) for t in range(prefill, ids.shape[1]))]:
        chunk_positions = None if positions is None else positions[:, start:stop]
        logits, cache = decode(model, ids[:, start:stop], cache, mask, chunk_positions)
        chunks.append(logits)
    assert int(cache["index"]) == ids.shape[1]
    return np.asarray(jnp.concatenate(chunks, axis=1))


def test_kv_cache_decoding_matches_full_forward(gpt2_pair):
    model, _ = gpt2_pair
    ids, _ = padded_batch(model.config)
    full = forward(model, ids, np.ones_like(ids))
    np.testing.assert_allclose(decode_in_steps(model, ids, prefill=9), full, atol=LOGITS_TOL,
                               rtol=0)


def test_kv_cache_with_left_padding_matches_transformers(gpt2_pair):
    """Left-padded prompts, positions counted over real tokens, as transformers' generate does."""
    model, reference = gpt2_pair
    ids = np.random.RandomState(3).randint(0, VOCAB, (4, 12))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :7] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask),
                             position_ids=torch.tensor(positions)).logits.numpy()
    got = decode_in_steps(model, ids, prefill=9, mask=mask, positions=positions)
    assert np.isfinite(got).all()  # the left padding's queries see no key at all
    assert np.abs(got - expected)[mask == 1].max() <= LOGITS_TOL


def abstract_param_count(config) -> int:
    model = nnx.eval_shape(lambda: create_model(config))
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def published_config(name: str, config_class):
    path = CONFIGS / f"{name}.json"
    if path.exists():
        return config_class.from_dict(json.loads(path.read_text()))
    published = {"gpt2": {}, "roberta-base": dict(vocab_size=50265, max_position_embeddings=514,
                                                  type_vocab_size=1, layer_norm_eps=1e-5)}
    return config_class(**published[name])


def test_parameter_counts_equal_transformers():
    gpt2 = published_config("gpt2", GPT2Config)
    roberta = published_config("roberta-base", RobertaConfig)
    assert abstract_param_count(gpt2) == 124_439_808
    assert abstract_param_count(roberta) == 124_697_433
    with torch.device("meta"):  # transformers' own count, without allocating
        assert GPT2LMHeadModel(gpt2).num_parameters() == 124_439_808
        assert RobertaForMaskedLM(roberta).num_parameters() == 124_697_433


@pytest.mark.parametrize("make_config", [gpt2_config, roberta_config])
def test_matmul_param_count_is_kernels_plus_vocab_projection(make_config):
    config = make_config()
    model = nnx.eval_shape(lambda: create_model(config))
    # plain nnx.Param are exactly the dense kernels; the vocabulary projection reuses an Embedding
    kernels = sum(math.prod(v.shape) for v in jax.tree.leaves(
        nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
        if type(v) is nnx.Param)
    assert matmul_param_count(config) == kernels + config.vocab_size * config.hidden_size
    # GPT-2 small: 12 * (4 * 768^2 + 2 * 768 * 3072) + 50257 * 768
    assert matmul_param_count(published_config("gpt2", GPT2Config)) == 123_532_032


@pytest.mark.parametrize("pair", ["gpt2_pair", "roberta_pair"])
def test_bfloat16_compute_stays_close_to_float32(pair, request):
    f32, reference = request.getfixturevalue(pair)
    bf16 = imported(reference.config, reference, dtype="bfloat16")
    ids, mask = padded_batch(reference.config)
    a, b = np.asarray(forward(f32, ids, mask)), np.asarray(forward(bf16, ids, mask))
    assert b.dtype == np.float32
    diff = np.abs(a - b)[mask == 1].max()
    # bfloat16 keeps 8 significand bits. Measured on these models (logits up to ~0.7):
    # max |logit diff| 3.1e-3 (GPT-2) / 3.9e-3 (RoBERTa), loss diff 1.5e-4 / 1.9e-4.
    assert 0.0 < diff <= 1.5e-2
    labels = np.where(mask == 1, ids, -100)
    assert abs(mean_ce(a, labels) - mean_ce(b, labels)) <= 1e-3


@pytest.mark.parametrize("pair", ["gpt2_pair", "roberta_pair"])
def test_dropout_only_with_a_key_and_deterministic_given_it(pair, request):
    model, _ = request.getfixturevalue(pair)
    ids, mask = padded_batch(model.config)
    eval_logits = forward(model, ids, mask)
    np.testing.assert_array_equal(eval_logits, forward(model, ids, mask))
    train = forward(model, ids, mask, dropout_key(1))
    np.testing.assert_array_equal(train, forward(model, ids, mask, dropout_key(1)))
    assert float(jnp.abs(train - eval_logits).max()) > 1e-3
    assert float(jnp.abs(train - forward(model, ids, mask, dropout_key(2))).max()) > 1e-3


def test_graphdef_is_hashable_for_jit_static_arguments():
    graphdef, params = nnx.split(create_model(gpt2_config()))
    same, _ = nnx.split(create_model(gpt2_config(), seed=1))
    assert hash(graphdef) == hash(same) and graphdef == same


def test_initialisation_follows_transformers():
    config = gpt2_config()  # initializer_range 0.02, 2 layers
    model = create_model(config)
    proj_std = 0.02 / math.sqrt(2 * 2)
    assert np.std(model.h.attn.qkv.kernel[...]) == pytest.approx(0.02, rel=0.03)
    assert np.std(model.wte.embedding[...]) == pytest.approx(0.02, rel=0.03)
    assert np.std(model.h.attn.out.kernel[...]) == pytest.approx(proj_std, rel=0.03)
    assert np.std(model.h.mlp.proj.kernel[...]) == pytest.approx(proj_std, rel=0.03)
    assert np.std(model.h.mlp.fc.kernel[...]) == pytest.approx(0.02, rel=0.03)
    assert not np.any(model.h.mlp.fc.bias[...]) and not np.any(model.ln_f.bias[...])
    np.testing.assert_array_equal(model.h.ln_1.scale[...], 1.0)
    # different seeds, different weights; the same seed, the same weights
    assert not np.array_equal(model.wte.embedding[...],
                              create_model(config, seed=1).wte.embedding[...])
    np.testing.assert_array_equal(model.wte.embedding[...],
                                  create_model(config).wte.embedding[...])
    roberta = create_model(roberta_config())
    assert not np.any(roberta.word_embeddings.embedding[...][PAD])
    assert not np.any(roberta.position_embeddings.embedding[...][PAD])
    assert np.std(roberta.word_embeddings.embedding[...][PAD + 1:]) == pytest.approx(0.02, rel=0.05)
    assert np.std(roberta.lm_head.dense.kernel[...]) == pytest.approx(0.02, rel=0.05)
    assert not np.any(roberta.lm_head.bias[...])


def test_activations_match_transformers():
    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    ours = jax.jit(lambda x: {name: fn(x) for name, fn in ACTIVATIONS.items()})(x)
    for name, values in ours.items():
        expected = ACT2FN[name](torch.tensor(x)).numpy()
        np.testing.assert_allclose(values, expected, atol=1e-5, rtol=0, err_msg=name)


def test_weight_decay_mask_by_parameter_kind_drives_optax():
    model = create_model(gpt2_config())
    graphdef, params = nnx.split(model, nnx.Param)
    mask = weight_decay_mask(params)
    kinds = {type(v): m for v, m in zip(
        jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)),
        jax.tree.leaves(mask), strict=True)}
    assert kinds == {nnx.Param: True, Embedding: True, Bias: False, LayerNormParam: False}
    # with zero gradients AdamW changes only what it decays
    optimizer = optax.adamw(0.1, weight_decay=0.5, mask=mask)

    @jax.jit
    def update_with_zero_grads(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = optimizer.update(zeros, optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    new = update_with_zero_grads(params)
    assert not np.array_equal(new["h"]["attn"]["qkv"]["kernel"][...],
                              params["h"]["attn"]["qkv"]["kernel"][...])
    np.testing.assert_array_equal(new["h"]["attn"]["qkv"]["bias"][...],
                                  params["h"]["attn"]["qkv"]["bias"][...])
    np.testing.assert_array_equal(new["ln_f"]["scale"][...], params["ln_f"]["scale"][...])


@pytest.mark.parametrize("make_config, options, names", [
    (lambda: gpt2_config(activation_function="mish"), {}, ("activation", "'mish'")),
    (lambda: gpt2_config(add_cross_attention=True), {}, ("add_cross_attention",)),
    (lambda: gpt2_config(n_embd=66), {}, ("66", "4", "heads")),
    (lambda: roberta_config(is_decoder=True), {}, ("is_decoder",)),
    (lambda: roberta_config(pad_token_id=None), {}, ("pad_token_id",)),
    (gpt2_config, {"dtype": "float16"}, ("dtype", "float16")),
    (gpt2_config, {"remat": "everything"}, ("remat", "everything")),
])
def test_unsupported_settings_are_user_errors(make_config, options, names):
    with raises_user_error(*names):
        create_model(make_config(), **options)


def test_unsupported_model_type_lists_the_supported_ones():
    from transformers import BertConfig

    with raises_user_error("model_type", "'bert'", "gpt2, roberta"):
        create_model(BertConfig())
    assert SUPPORTED_MODEL_TYPES == ("gpt2", "roberta")


def test_sequences_longer_than_the_position_table_are_user_errors():
    with raises_user_error("33", "n_positions 32"):
        forward(create_model(gpt2_config()), np.zeros((1, 33), np.int32))
    # RoBERTa positions start after pad_token_id: 40 - 2 = 38 tokens fit
    roberta = create_model(roberta_config())
    fits = jax.eval_shape(lambda ids: roberta(ids), np.full((1, 38), 5, np.int32))
    assert fits.shape == (1, 38, VOCAB)
    with raises_user_error("39", "max_position_embeddings >= 41"):
        forward(roberta, np.full((1, 39), 5, np.int32))


def blocked_attention_inputs(length: int):
    keys = jax.random.split(jax.random.key(7), 3)
    q, k, v = (jax.random.normal(key, (3, length, 2, 8)) for key in keys)
    padding = np.ones((3, length), np.int32)
    padding[1, length - 5:] = 0  # right padding: every query still has a key to attend to
    mask = attention.attention_mask_4d(jnp.asarray(padding), jnp.arange(length), length, causal=True)
    return q, k, v, mask


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_blocked_causal_attention_equals_the_full_score_matrix(monkeypatch, rate):
    """causal=True computes query blocks against their key prefixes only; outputs and gradients
    must equal attention over the full masked score matrix, dropout included (float32: 1e-5)."""
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 8)
    q, k, v, mask = blocked_attention_inputs(length=32)  # 4 blocks
    key = jax.random.key(8)

    def attend(causal):
        def f(q, k, v):
            return attention.dot_product_attention(q, k, v, mask, scale=0.3, dropout_rate=rate,
                                                   dropout_key=key, causal=causal)
        out, vjp = jax.vjp(jax.jit(f), q, k, v)
        return out, vjp(jnp.cos(out))

    (full, full_grads), (blocked, blocked_grads) = attend(False), attend(True)
    np.testing.assert_allclose(blocked, full, atol=1e-5, rtol=0)
    for got, want in zip(blocked_grads, full_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_gpt2_with_blocked_attention_matches_transformers(monkeypatch):
    """The GPT-2 parity check (padded batch, sdpa and eager) with the attention in blocks of 4
    of the 12 positions; a fresh jit, so no trace from the unblocked model is reused."""
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 4)
    config = gpt2_config()
    ids, mask = padded_batch(config)
    for attn_implementation in ("eager", "sdpa"):
        reference = torch_model(config, attn_implementation)
        ours = imported(config, reference)
        got = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(ours, ids, mask))
        with torch.no_grad():
            expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        assert np.isfinite(got).all()
        assert np.abs(got - expected.numpy())[mask == 1].max() <= LOGITS_TOL


def test_bfloat16_lm_head_backward_multiplies_in_bfloat16():
    """The bfloat16 head's gradient: its matmuls take bfloat16 operands (none float32 x
    bfloat16), the logits are the plain product's exactly, and the gradients are autodiff's of
    the plain product within bfloat16 rounding of the logits' cotangent (relative 2e-2)."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 32)).astype(jnp.bfloat16)
    table = 0.2 * jax.random.normal(jax.random.key(1), (50, 32))
    labels = jnp.arange(12).reshape(2, 6)

    def loss(head):
        def f(x, table):
            return optax.softmax_cross_entropy_with_integer_labels(head(x, table), labels).sum()
        return f

    def plain(x, table):
        return jnp.einsum("...d,vd->...v", x, table.astype(x.dtype),
                          preferred_element_type=jnp.float32)

    np.testing.assert_array_equal(layers.low_precision_head(x, table), plain(x, table))
    grad = jax.grad(loss(layers.low_precision_head), argnums=(0, 1))
    dots = [eqn for eqn in jax.make_jaxpr(grad)(x, table).jaxpr.eqns
            if eqn.primitive.name == "dot_general"]
    assert len(dots) == 2  # the backward's (the forward's is inside the custom_vjp call)
    assert all(v.aval.dtype == jnp.bfloat16 for eqn in dots for v in eqn.invars)
    got, want = grad(x, table), jax.grad(loss(plain), argnums=(0, 1))(x, table)
    assert got[1].dtype == jnp.float32
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()
