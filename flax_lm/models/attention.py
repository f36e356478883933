"""Self-attention, and which implementation computes it on which backend.

The models hold an implementation NAME, chosen once by `choose_attention` from the platform's
entry in flax_lm/backend.py and the compute dtype (or named by the user, `--attn_implementation`);
only this module knows what a name means:

- "reference": einsums with float32 logits and softmax, causal attention computed in query blocks
  against their key prefixes (`dot_product_attention`), dropout with layers.keep_mask. The CPU's
  path, and every backend's when attention dropout is active or when decoding against a cache.
- "xla": `jax.nn.dot_product_attention(implementation="xla")` with the same dense mask; TPUs and
  float32 on GPUs.
- "cudnn": cuDNN's fused (flash) attention on NVIDIA GPUs, bfloat16: causal masking by
  `is_causal` and padding by key lengths, so no [batch, 1, q, k] mask is built and the masked
  upper triangle is skipped. The padding mask must be right padding (ones, then zeros), as the
  data pipeline and tokenizers make it. JAX's API does not expose cuDNN's dropout (and its seed
  would be a compile-time constant, the same mask every step), so training with attention
  dropout takes the reference path, with the same counter-based mask as on every backend.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from flax_lm.backend import choices_for
from flax_lm.models.errors import ModelError
from flax_lm.models.layers import Dense, dropout, split_key

IMPLEMENTATIONS = ("reference", "xla", "cudnn")
CHOICES = ("auto", *IMPLEMENTATIONS)
FUSED_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN's fused attention takes
# What "cudnn" passes to jax.nn.dot_product_attention; the CPU tests run the very same call
# with "xla" to check the arguments built for it.
CUDNN_BACKEND = "cudnn"


def check_heads(width: int, num_heads: int) -> None:
    """Attention splits the hidden size evenly over its heads."""
    if width % num_heads:
        raise ModelError(f"hidden size {width} is not divisible by {num_heads} attention heads")


def choose_attention(platform: str, dtype: Any, requested: str = "auto") -> str:
    """The attention implementation for a model computing in `dtype` on `platform` ("cpu",
    "tpu", "cuda", "rocm", "gpu"): `requested` when it is not "auto" (checked), otherwise the
    platform's choice in flax_lm/backend.py: cuDNN's fused attention on NVIDIA GPUs in
    bfloat16/float16, the reference path on CPUs, and XLA's on the rest."""
    if requested not in CHOICES:
        raise ModelError(f"unknown attention implementation {requested!r}; "
                        f"choose one of {', '.join(CHOICES)}")
    fused_dtype = jnp.dtype(dtype) in FUSED_DTYPES
    if requested == "cudnn" and (platform not in ("cuda", "gpu") or not fused_dtype):
        raise ModelError(f"attention implementation 'cudnn' needs an NVIDIA GPU and bfloat16 "
                        f"compute (--dtype bfloat16); here: {platform}, {jnp.dtype(dtype).name}")
    if requested != "auto":
        return requested
    choices = choices_for(platform)
    return choices.fused_attention if fused_dtype else choices.attention


class AttentionMask(NamedTuple):
    """Which keys each query sees, in the forms the implementations take.

    dense: bool [batch|1, 1, q, k] (True = attend) or None (everything); what "reference" and
        "xla" use. key_lengths: int32 [batch], the number of leading real keys of each row (at
        least 1), or None (no padding); with `causal`, what "cudnn" uses. Building both costs
        nothing: the compiled step keeps only the one its implementation reads.
    """

    dense: jax.Array | None
    key_lengths: jax.Array | None


def self_attention_mask(padding_mask: jax.Array | None, length: int, *,
                        causal: bool) -> AttentionMask:
    """The mask of queries and keys at the same positions 0..length-1, from a right-padded
    [batch, length] padding mask (1 = real token) and, for causal models, key <= query."""
    dense = attention_mask_4d(padding_mask, jnp.arange(length), length, causal=causal)
    lengths = None
    if padding_mask is not None:  # a fully padded row attends to its first key: never empty
        lengths = jnp.maximum(padding_mask.astype(jnp.int32).sum(axis=-1), 1)
    return AttentionMask(dense, lengths)


def cache_attention_mask(padding_mask: jax.Array | None, query_positions: jax.Array,
                         key_len: int) -> AttentionMask:
    """The causal mask of queries at `query_positions` over a cache of `key_len` slots, with a
    [batch, key_len] padding mask over the slots (possibly left padding)."""
    return AttentionMask(attention_mask_4d(padding_mask, query_positions, key_len, causal=True),
                         None)


def attention_mask_4d(padding_mask: jax.Array | None, query_positions: jax.Array, key_len: int,
                      *, causal: bool) -> jax.Array | None:
    """Boolean [batch|1, 1, q, k] mask (True = attend) from a [batch, k] padding mask (1 = keep)
    and, for causal models, key position <= query position."""
    mask = None
    if causal:
        mask = (jnp.arange(key_len)[None, :] <= query_positions[:, None])[None, None]
    if padding_mask is not None:
        keep = padding_mask.astype(bool)[:, None, None, :]
        mask = keep if mask is None else mask & keep
    return mask


def attend(implementation: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
           *, scale: float | jax.Array, causal: bool, dropout_rate: float,
           dropout_key: jax.Array | None) -> jax.Array:
    """Attention over [batch, len, heads, head_dim] inputs by the named implementation.

    `causal=True`: queries and keys are the same positions and later keys are hidden (the mask
    says so too). Attention dropout (a key and a rate > 0) always takes the reference path.
    """
    dropping = dropout_key is not None and dropout_rate > 0.0
    if implementation == "reference" or dropping:
        return dot_product_attention(q, k, v, mask.dense, scale=scale, dropout_rate=dropout_rate,
                                     dropout_key=dropout_key, causal=causal)
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense, scale=scale,
                                            implementation="xla")
    if implementation == "cudnn":
        return fused_attention(q, k, v, mask, scale=scale, causal=causal,
                               backend=CUDNN_BACKEND)
    raise ValueError(f"unknown attention implementation {implementation!r}")


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                    scale: float | jax.Array, causal: bool, backend: str) -> jax.Array:
    """jax.nn.dot_product_attention as the fused kernels take it: `is_causal` and key lengths
    instead of a dense mask, and a constant scale (a traced one, as GPT-2's
    scale_attn_by_inverse_layer_idx gives, is folded into the queries)."""
    if not isinstance(scale, (int, float)):
        q, scale = q * scale.astype(q.dtype), 1.0
    return jax.nn.dot_product_attention(q, k, v, scale=float(scale), is_causal=causal,
                                        key_value_seq_lengths=mask.key_lengths,
                                        implementation=backend)


# The reference path (the CPU's, flax_lm/backend.py) computes causal attention over at least two
# blocks of this many queries block by block: XLA:CPU computes every score of a full matrix,
# masked or not, so skipping the upper triangle is work saved there.
CAUSAL_BLOCK = 128


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
                          scale: float | jax.Array, dropout_rate: float,
                          dropout_key: jax.Array | None, causal: bool = False) -> jax.Array:
    """The reference attention, with float32 logits and softmax.

    Masked logits become a large negative number, so a fully masked row (a padding query) attends
    uniformly, never giving NaN. `causal=True` says that queries and keys are the same positions
    and `mask` hides every later key: the queries then go in blocks of CAUSAL_BLOCK, each against
    the keys up to its end only, skipping the masked upper triangle (at 512 positions, 5/8 of the
    full score matrix is computed). The result is the same up to float rounding, dropout included,
    for every query with a key to attend to.
    """
    length = q.shape[1]
    if not causal or k.shape[1] != length or length < 2 * CAUSAL_BLOCK or length % CAUSAL_BLOCK:
        return _attend(q, k, v, mask, scale, dropout_rate, dropout_key)
    full_shape = (q.shape[0], q.shape[2], length, length)  # of the score matrix [b, n, t, s]
    outputs = []
    for start in range(0, length, CAUSAL_BLOCK):
        end = start + CAUSAL_BLOCK
        block_mask = None if mask is None else mask[..., start:end, :end]
        outputs.append(_attend(q[:, start:end], k[:, :end], v[:, :end], block_mask, scale,
                               dropout_rate, dropout_key, origin=(0, 0, start, 0),
                               full_shape=full_shape))
    return jnp.concatenate(outputs, axis=1)


def _attend(q, k, v, mask, scale, dropout_rate, dropout_key, **block):
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, dropout_key, **block)
    return jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with fused q/k/v projection ([d, 3d], q|k|v along the output axis)
    and output projection. Dropout on the attention probabilities and on the output.
    `implementation`: one of IMPLEMENTATIONS (see choose_attention)."""

    def __init__(self, features: int, num_heads: int, key: jax.Array, *, std: float,
                 out_std: float, attn_dropout: float, out_dropout: float, causal: bool = False,
                 implementation: str = "reference"):
        qkv_key, out_key = jax.random.split(key)
        self.causal = causal
        self.qkv = Dense(features, 3 * features, qkv_key, std=std, axes=("embed", "heads"))
        self.out = Dense(features, features, out_key, std=out_std, axes=("heads", "embed"))
        self.num_heads = num_heads
        self.attn_dropout = float(attn_dropout)
        self.out_dropout = float(out_dropout)
        self.implementation = implementation

    def __call__(self, x: jax.Array, mask: AttentionMask, *, scale: float | jax.Array,
                 dropout_key: jax.Array | None = None, kv_cache: tuple | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, tuple | None]:
        """Returns (output, updated kv_cache). With `kv_cache` = (keys, values) of shape
        [batch, max_len, heads, head_dim], this step's keys/values are written at `cache_index`
        and the queries attend over the whole cache (the mask hides unwritten slots), by the
        reference path: a cache's mask is neither causal from its first slot nor right-padded."""
        batch, length, features = x.shape
        heads = (batch, length, self.num_heads, features // self.num_heads)
        qkv = checkpoint_name(self.qkv(x), "qkv")  # names for layers.REMAT_POLICIES
        q, k, v = (t.reshape(heads) for t in jnp.split(qkv, 3, axis=-1))
        implementation = self.implementation
        if kv_cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype), start)
            kv_cache, implementation = (k, v), "reference"
        probs_key, out_key = split_key(dropout_key, 2)
        y = attend(implementation, q, k.astype(q.dtype), v.astype(q.dtype), mask, scale=scale,
                   causal=self.causal and kv_cache is None, dropout_rate=self.attn_dropout,
                   dropout_key=probs_key)
        y = checkpoint_name(self.out(y.reshape(batch, length, features)), "attn_out")
        return dropout(y, self.out_dropout, out_key), kv_cache
