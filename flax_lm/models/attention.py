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
- "splash": Pallas' splash (flash) attention on TPUs v4 and later
  (`jax.experimental.pallas.ops.tpu.splash_attention`): causal by its block mask, padding by
  segment ids (real tokens one segment, padding another), blocks of SPLASH_BLOCK positions, so
  the sequence length must be a multiple of it. Under a mesh each device runs the kernel on its
  own rows (`shard_map`): a Pallas call is opaque to XLA's partitioner. The kernel has no
  dropout (MaxText's splash path has none either), so attention dropout takes the reference path.

A fast kernel ("cudnn", "splash") may fail where its platform is right: a cuDNN build that does
not match CUDA, a libtpu without Mosaic support for the chip. `settle_attention`, called once
where a training run is set up, runs it (forward and gradients, causal and padded) on a small
input on this machine against the reference, and takes XLA's attention, saying why, where it
cannot compile, run, or agree.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from flax_lm.backend import choices_for
from flax_lm.models.errors import ModelError
from flax_lm.models.layers import Dense, dropout, rows_spec, split_key

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "splash")
FAST_KERNELS = ("cudnn", "splash")  # compiled by a library that a machine may lack or break
CHOICES = ("auto", *IMPLEMENTATIONS)
FUSED_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN's fused attention takes
# What "cudnn" passes to jax.nn.dot_product_attention; the CPU tests run the very same call
# with "xla" to check the arguments built for it.
CUDNN_BACKEND = "cudnn"


def check_heads(width: int, num_heads: int) -> None:
    """Attention splits the hidden size evenly over its heads."""
    if width % num_heads:
        raise ModelError(f"hidden size {width} is not divisible by {num_heads} attention heads")


NAMED = "named by --attn_implementation"  # the reason of a choice the user made


class AttentionChoice(NamedTuple):
    """The implementation a run uses and why (printed, and in metrics.jsonl's header)."""

    implementation: str
    reason: str


# Why attention dropout (> 0 while training) takes the reference path whatever was chosen: the
# fused kernels reachable from JAX cannot apply flax-lm's counter-based mask, and their own
# dropout would not do either.
DROPOUT_FALLBACK = {
    "cudnn": "JAX's dot_product_attention has no dropout argument; cuDNN's own dropout, reached "
             "only through JAX internals, takes its seed as a compile-time constant (the same "
             "mask every step)",
    "splash": "Pallas' splash kernel has no dropout; one would need the counter-based mask "
              "inside the kernel",
    "xla": "XLA's dot_product_attention has no dropout argument",
}


def choose_attention(platform: str, dtype: Any, requested: str = "auto") -> str:
    """The attention implementation for a model computing in `dtype` on `platform` ("cpu",
    "tpu", "tpu_v3", "cuda", "rocm", "gpu"): `requested` when it is not "auto" (checked),
    otherwise the platform's choice in flax_lm/backend.py: cuDNN's fused attention on NVIDIA
    GPUs in bfloat16/float16, splash attention on TPUs v4 and later, the reference path on CPUs,
    and XLA's on the rest."""
    return attention_choice(platform, dtype, requested).implementation


def attention_choice(platform: str, dtype: Any, requested: str = "auto") -> AttentionChoice:
    """`choose_attention`, with the reason for the choice."""
    if requested not in CHOICES:
        raise ModelError(f"unknown attention implementation {requested!r}; "
                        f"choose one of {', '.join(CHOICES)}")
    dtype_name = jnp.dtype(dtype).name
    fused_dtype = jnp.dtype(dtype) in FUSED_DTYPES
    if requested == "cudnn" and (platform not in ("cuda", "gpu") or not fused_dtype):
        raise ModelError(f"attention implementation 'cudnn' needs an NVIDIA GPU and bfloat16 "
                         f"compute (--dtype bfloat16); here: {platform}, {dtype_name}")
    if requested == "splash" and platform != "tpu":
        raise ModelError(f"attention implementation 'splash' needs a TPU v4 or later; "
                         f"here: {platform}")
    if requested != "auto":
        return AttentionChoice(requested, NAMED)
    choices = choices_for(platform)
    name = choices.fused_attention if fused_dtype else choices.attention
    return AttentionChoice(name, f"the choice for {platform} in {dtype_name}")


def settle_attention(choice: AttentionChoice, *, heads: int, head_dim: int, length: int,
                     causal: bool, dtype: Any, attn_dropout: float,
                     try_kernel: bool = True) -> AttentionChoice:
    """The attention a training run takes: `choice`, unless it is a fast kernel that cannot take
    `length`, or (`try_kernel`: on this process's devices) fails to compile or run, or differs
    from the reference, on a small input of the run's geometry; then XLA's, the reason saying
    why. A kernel the user named that fails is a ModelError. Attention dropout in the model adds
    why it takes the reference path while training (DROPOUT_FALLBACK)."""
    name, reason = choice
    problem = None
    if name == "splash" and length % SPLASH_BLOCK:
        problem = f"it needs a sequence length that is a multiple of {SPLASH_BLOCK}, not {length}"
    elif name in FAST_KERNELS and try_kernel:
        problem = kernel_problem(name, heads=heads, head_dim=head_dim, length=length,
                                 causal=causal, dtype=dtype)
    if problem is not None:
        if reason == NAMED:
            raise ModelError(f"--attn_implementation {name}: {problem}")
        name, reason = "xla", f"{name} attention cannot be used here: {problem}"
    if attn_dropout > 0 and name != "reference":
        reason += (f"; while training, attention dropout {attn_dropout:g} takes the reference "
                   f"path: {DROPOUT_FALLBACK[name]}")
    return AttentionChoice(name, reason)


# How far a fast kernel may be from the reference on kernel_problem's input (unit-normal q, k,
# v): bfloat16 keeps 8 bits of mantissa, and the kernels round their probabilities to it.
KERNEL_TOLERANCE = {"float32": 2e-3, "bfloat16": 5e-2, "float16": 1e-2}


def kernel_problem(name: str, *, heads: int, head_dim: int, length: int, causal: bool,
                   dtype: Any) -> str | None:
    """What goes wrong when the kernel `name` runs here on two rows of `length` tokens (one
    right-padded to half its length), forward and gradients, compared with the reference
    attention; None when it agrees. Run on this process's first device."""
    shape = (2, length, heads, head_dim)
    q, k, v = (jax.random.normal(key, shape).astype(dtype)
               for key in jax.random.split(jax.random.key(0), 3))
    padding = (jnp.arange(length)[None] < jnp.array([length, max(length // 2, 1)])[:, None])
    mask = self_attention_mask(padding.astype(jnp.int32), length, causal=causal)
    real = padding[:, :, None, None]

    def loss(implementation, q, k, v):
        y = attend(implementation, q, k, v, mask, scale=head_dim**-0.5, causal=causal,
                   dropout_rate=0.0, dropout_key=None)
        return jnp.sum(jnp.where(real, y.astype(jnp.float32), 0.0)), y

    def run(implementation):
        grad = jax.value_and_grad(functools.partial(loss, implementation), (0, 1, 2),
                                  has_aux=True)
        (_, y), grads = jax.jit(grad)(q, k, v)
        return jax.device_get((jnp.where(real, y, 0), *grads))

    try:
        got = run(name)
    except Exception as err:  # noqa: BLE001 - compilers and runtimes raise their own types
        return " ".join(str(err).split())[:300] or type(err).__name__
    want = run("reference")
    tolerance = KERNEL_TOLERANCE.get(jnp.dtype(dtype).name, 5e-2)
    for what, a, b in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        error = float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1.0))
        if not error <= tolerance:
            return (f"its {what} differs from the reference attention by {error:.3g} "
                    f"(of the largest value; tolerance {tolerance:g})")
    return None


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
    says so too). Attention dropout (a key and a rate > 0) always takes the reference path
    (DROPOUT_FALLBACK says why).
    """
    dropping = dropout_key is not None and dropout_rate > 0.0
    if implementation == "reference" or dropping:
        return dot_product_attention(q, k, v, mask.dense, scale=scale, dropout_rate=dropout_rate,
                                     dropout_key=dropout_key, causal=causal)
    if implementation not in KERNELS:
        raise ValueError(f"unknown attention implementation {implementation!r}")
    return KERNELS[implementation](q, k, v, mask, scale=scale, causal=causal)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                  scale: float | jax.Array, causal: bool) -> jax.Array:
    """XLA's attention with the dense mask (`causal` is in it)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense, scale=scale,
                                        implementation="xla")


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                    scale: float | jax.Array, causal: bool) -> jax.Array:
    return fused_attention(q, k, v, mask, scale=scale, causal=causal, backend=CUDNN_BACKEND)


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


# Splash attention's query and key blocks: the kernel's lane width on TPUs, the smallest block
# it takes (so the sequence length must be a multiple of it).
SPLASH_BLOCK = 128


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                     scale: float | jax.Array, causal: bool, interpret: bool = False) -> jax.Array:
    """Pallas' splash attention: causal by its block mask (blocks above the diagonal are skipped),
    padding by segment ids from the key lengths (right padding, as for cuDNN: real tokens are
    segment 1, padding segment 0, so a padding query attends padding keys and never an empty
    row). The scale is folded into the queries. Under a mesh (`layers.rows_spec`) each device
    runs the kernel on its own rows. `interpret`: run the kernel in Pallas' interpreter (CPUs)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, length, heads, _ = q.shape
    lengths = mask.key_lengths
    if lengths is None:
        lengths = jnp.full((batch,), length, jnp.int32)

    def run(q, k, v, lengths):
        kernel = splash_kernel(length, heads, causal, interpret)
        segments = (jnp.arange(length)[None] < lengths[:, None]).astype(jnp.int32)
        heads_first = [t.swapaxes(1, 2) for t in (q * jnp.asarray(scale, q.dtype), k, v)]
        out = jax.vmap(kernel)(*heads_first, segment_ids=splash.SegmentIds(segments, segments))
        return out.swapaxes(1, 2)

    spec = rows_spec(q.shape)
    if spec is None:
        return run(q, k, v, lengths)
    rows = jax.sharding.PartitionSpec(spec[0])
    return jax.shard_map(run, in_specs=(spec, spec, spec, rows), out_specs=spec,
                         check_vma=False)(q, k, v, lengths)


def splash_kernel(length: int, heads: int, causal: bool, interpret: bool) -> Callable:
    """The splash kernel over [heads, length, head_dim] for one row. Made inside the trace that
    calls it: its block masks are computed on the host and enter that program as its constants
    (made eagerly instead, they would run on the devices in use, which under `flax-lm plan` are
    a TPU topology's that compile but never run)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = splash.BlockSizes(*(SPLASH_BLOCK,) * 3, *(SPLASH_BLOCK,) * 5)
    one = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=block,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


# The fast implementations by name, each (q, k, v, mask, *, scale, causal) -> output.
KERNELS: dict[str, Callable[..., jax.Array]] = {
    "xla": xla_attention, "cudnn": cudnn_attention, "splash": splash_attention,
}


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
