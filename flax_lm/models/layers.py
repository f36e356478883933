"""Pieces shared by GPT-2 and RoBERTa: parameter kinds, dense/embedding/LayerNorm, MLP, dropout,
and the scanned layer stack (attention is in attention.py).

Every parameter names its axes with logical names (Flax's `out_sharding` metadata): "vocab" (rows
of an embedding table: tokens, positions or token types), "embed" (the model width), "heads"
(attention's heads x head_dim, q|k|v fused), "mlp" (the MLP's hidden width) and "layers" (the
stacked layers' leading axis). A model never names a device-mesh axis: the trainer maps logical
names to mesh axes with its rules table (flax_lm/train/step.py), so placement changes there only.

Parameters are float32. Every layer computes in the dtype of its input (float32 or bfloat16), so
the model casts the embeddings once and the parameters are cast where they are used. LayerNorm
statistics and the attention softmax are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen import get_logical_axis_rules
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from flax_lm.models.errors import ModelError


def param(kind: type[nnx.Param], value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    """A parameter of type `kind` whose axes have the logical names `axes`. Placement is never
    applied when it is created (no mesh is needed to build a model): the trainer reads the names."""
    return kind(value, out_sharding=axes, eager_sharding=False)


class Embedding(nnx.Param):
    """An embedding table (weight-decayed)."""


class Bias(nnx.Param):
    """An additive bias (not weight-decayed)."""


class LayerNormParam(nnx.Param):
    """A LayerNorm scale or offset (not weight-decayed)."""


NO_DECAY_KINDS = (Bias, LayerNormParam)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# What each block keeps for the backward pass, which recomputes the rest (same numbers, more
# FLOPs, less memory). In units of batch x seq x width activations a layer (GPT-2, MLP 4x wide):
# "full" keeps only the block's input; "qkv_out" the q/k/v projection and the attention's output
# projection (4 units); "mlp" the MLP's hidden layer before its activation and the attention's
# output projection (5 units, and it skips recomputing the widest matmul); "dots" every
# projection's output (9 units: the least recomputed). The names are set in attention.py and MLP.
REMAT_POLICIES = {
    "full": None,
    "qkv_out": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
    "mlp": jax.checkpoint_policies.save_only_these_names("mlp_hidden", "attn_out"),
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ModelError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return name


def check_remat(remat: str | None) -> str | None:
    if remat is not None and remat not in REMAT_POLICIES:
        choices = ", ".join(map(repr, REMAT_POLICIES))
        raise ModelError(f"unsupported remat {remat!r}; use None, {choices}")
    return remat


def normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


def split_key(key: jax.Array | None, num: int) -> Any:
    """`num` keys from `key`, or `num` Nones when dropout is off (key None)."""
    return (None,) * num if key is None else tuple(jax.random.split(key, num))


def _mix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 with full avalanche."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep_prob: float, *,
              origin: tuple[int, ...] | None = None,
              full_shape: tuple[int, ...] | None = None) -> jax.Array:
    """Boolean mask, True with probability `keep_prob`, independent per element.

    Dropout draws more random numbers than anything else in training (GPT-2 124M: 151M per step
    for the attention probabilities alone), and threefry's rounds make each costly where they are
    not hidden behind memory traffic, as on a CPU. Here each element hashes its flat index, keyed
    by two uint32 words drawn from `key` with threefry: two rounds of a bijective avalanche mix,
    fused by XLA into the op that uses the mask, and the same under any sharding and on every
    platform (flax_lm/backend.py). For dropout only: not a general-purpose generator.

    `origin` and `full_shape` give the mask of the block at `origin` of a `full_shape` array:
    the same values as slicing the full array's mask, so a computation done in blocks drops
    exactly what the unblocked one would.
    """
    full_shape = shape if full_shape is None else full_shape
    origin = (0,) * len(shape) if origin is None else origin
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    index, stride = jnp.zeros((), jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        along = jax.lax.broadcasted_iota(jnp.uint32, shape, axis) + jnp.uint32(origin[axis])
        index, stride = index + along * jnp.uint32(stride), stride * full_shape[axis]
    bits = _mix32(_mix32(index ^ seeds[0]) + seeds[1])
    threshold = min(round(keep_prob * 2.0**32), 2**32 - 1)
    return bits < jnp.uint32(threshold)


def dropout(x: jax.Array, rate: float, key: jax.Array | None, **block) -> jax.Array:
    """Inverted dropout; the identity when `key` is None (eval) or the rate is 0. `block`:
    keep_mask's `origin` and `full_shape`, when `x` is one block of a larger array."""
    if key is None or rate == 0.0:
        return x
    keep = keep_mask(key, x.shape, 1.0 - rate, **block)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Dense(nnx.Module):
    """y = x @ kernel + bias, with kernel stored [in, out] (transformers' Conv1D layout);
    `axes`: the logical names of (in, out)."""

    def __init__(self, in_features: int, out_features: int, key: jax.Array, *, std: float,
                 axes: tuple[str, str], use_bias: bool = True):
        self.kernel = param(nnx.Param, normal(key, (in_features, out_features), std), axes)
        bias = jnp.zeros((out_features,), jnp.float32)
        self.bias = param(Bias, bias, axes[1:]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)

    def matmul(self, x: jax.Array) -> jax.Array:
        """x @ kernel in x's dtype, without the bias."""
        return x @ self.kernel[...].astype(x.dtype)


class Embed(nnx.Module):
    """A [num, features] table; `padding_idx` starts as a zero row, as in torch.nn.Embedding."""

    def __init__(self, num: int, features: int, key: jax.Array, *, std: float,
                 padding_idx: int | None = None):
        table = normal(key, (num, features), std)
        if padding_idx is not None:
            table = table.at[padding_idx].set(0.0)
        self.embedding = param(Embedding, table, ("vocab", "embed"))

    def __call__(self, ids: jax.Array, dtype: Any) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)


def vocab_logits(x: jax.Array, table: jax.Array) -> jax.Array:
    """x @ table.T with float32 accumulation and output: the LM head (tied or not)."""
    if x.dtype == jnp.float32:
        return jnp.einsum("...d,vd->...v", x, table, preferred_element_type=jnp.float32)
    return low_precision_head(x, table)


@jax.custom_vjp
def low_precision_head(x: jax.Array, table: jax.Array) -> jax.Array:
    """Float32 logits x @ table.T of bfloat16 `x` and a float32 `table` multiplied in x's dtype.

    Differentiated as is, the float32 cotangent of the logits would make both backward matmuls
    (the largest of the model at a large vocabulary) float32 x bfloat16 products, which GPUs run at
    float32 speed. Here the cotangent is rounded to x's dtype, as the logits' gradient is under
    PyTorch autocast, and both products accumulate in float32; the table's gradient stays float32.
    """
    return jnp.einsum("...d,vd->...v", x, table.astype(x.dtype),
                      preferred_element_type=jnp.float32)


def _low_precision_head_forward(x, table):
    return low_precision_head(x, table), (x, table)


def _low_precision_head_backward(residuals, grad):
    x, table = residuals
    grad = grad.astype(x.dtype)
    dx = jnp.einsum("...v,vd->...d", grad, table.astype(x.dtype),
                    preferred_element_type=jnp.float32).astype(x.dtype)
    dtable = jnp.einsum("...v,...d->vd", grad, x, preferred_element_type=jnp.float32)
    return dx, dtable.astype(table.dtype)


low_precision_head.defvjp(_low_precision_head_forward, _low_precision_head_backward)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (biased variance, as torch), statistics in float32."""

    def __init__(self, features: int, eps: float):
        self.scale = param(LayerNormParam, jnp.ones((features,), jnp.float32), ("embed",))
        self.bias = param(LayerNormParam, jnp.zeros((features,), jnp.float32), ("embed",))
        self.eps = float(eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class MLP(nnx.Module):
    """fc -> activation -> proj -> dropout. `recompute_activation`: the activation recomputed in
    the backward pass (`recomputed_activation`), for layers that run unrolled."""

    def __init__(self, features: int, hidden: int, key: jax.Array, *, activation: str, std: float,
                 out_std: float, dropout_rate: float, recompute_activation: bool = False):
        fc_key, proj_key = jax.random.split(key)
        self.fc = Dense(features, hidden, fc_key, std=std, axes=("embed", "mlp"))
        self.proj = Dense(hidden, features, proj_key, std=out_std, axes=("mlp", "embed"))
        self.activation = check_activation(activation)
        self.dropout_rate = float(dropout_rate)
        self.recompute_activation = bool(recompute_activation)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        if self.recompute_activation:
            hidden = checkpoint_name(self.fc.matmul(x), "mlp_hidden")
            bias = None if self.fc.bias is None else self.fc.bias[...].astype(x.dtype)
            activated = recomputed_activation(self.activation, hidden, bias)
        else:
            activated = ACTIVATIONS[self.activation](checkpoint_name(self.fc(x), "mlp_hidden"))
        return dropout(self.proj(activated), self.dropout_rate, dropout_key)


def recomputed_activation(name: str, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    """ACTIVATIONS[name](x + bias), recomputed in the backward pass from x and the bias alone.

    In unrolled layers, XLA keeps what autodiff leaves for the backward pass: the activation's
    inner terms (the GELU's tanh or erf parts), another array the size of x written in the
    forward pass and read in the backward, and the biased x a third. Recomputed, the forward pass
    writes only the activation and the backward reads only x, so a GPU step moves fewer bytes
    and holds fewer temporaries (bench/gpu_estimate.py; the figures are in docs/performance.md,
    "On a GPU"). The barrier
    `jax.checkpoint` puts in (prevent_cse) is what keeps XLA from merging the recomputation back
    into the forward pass. Scanned layers leave it out: there JAX itself picks what the backward
    pass reads, and on a TPU the scanned GPT-2 recipe held more memory with it, not less."""
    def biased(x, bias):
        return ACTIVATIONS[name](x if bias is None else x + bias)

    return jax.checkpoint(biased)(x, bias)


# Logical axis name of an activation's batch axis (rows), as "embed" names a parameter's width.
ACTIVATION_BATCH = "activation_batch"
MeshAxes = str | tuple[str, ...] | None


def mesh_spec(axes: tuple[str | None, ...], shape: tuple[int, ...],
              rules: tuple[tuple[str, MeshAxes], ...], mesh_shape: Any) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have the logical names `axes`, by `rules`
    (logical name -> mesh axis or axes): each mesh axis shards the first dimension whose rule
    names it and whose size it divides; a dimension it does not divide stays whole."""
    by_name = dict(rules)
    spec: list[MeshAxes] = []
    taken: set[str] = set()
    for name, size in zip(axes, shape, strict=True):
        if name is not None and name not in by_name:
            raise ValueError(f"logical axis {name!r} has no rule")
        mesh_axes = by_name.get(name)
        group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        fits = bool(group) and size % math.prod(mesh_shape[a] for a in group) == 0
        spec.append(mesh_axes if fits and not taken & set(group) else None)
        taken |= set(group) if spec[-1] else set()
    return PartitionSpec(*spec)


def shard_rows(x: jax.Array) -> jax.Array:
    """Activations [batch, ...] kept split on their rows as the batch is, where the trainer
    compiles the step with its logical axis rules and mesh set (`flax.linen.logical_axis_rules`,
    `jax.set_mesh`); unchanged elsewhere. Without it, FSDP's weights split on their width lead
    XLA to split the activations on the width too: every device computing the whole batch,
    with activation-sized all-reduces, instead of gathering each layer's weights."""
    spec = rows_spec(x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def rows_spec(shape: tuple[int, ...]) -> PartitionSpec | None:
    """The PartitionSpec of an activation of `shape` split on its rows (its first axis) as the
    batch is, where the trainer compiles the step with its rules and mesh set; None elsewhere."""
    rules, mesh = get_logical_axis_rules(), jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return None
    axes = (ACTIVATION_BATCH,) + (None,) * (len(shape) - 1)
    return mesh_spec(axes, shape, rules, mesh.shape)


def stacked(make_layer: Callable[[jax.Array], nnx.Module], key: jax.Array, num: int) -> nnx.Module:
    """`num` layers as ONE module whose parameters have a leading [num] axis, named "layers"."""
    vmapped = nnx.vmap(make_layer, in_axes=0, out_axes=0,
                       transform_metadata={nnx.PARTITION_NAME: "layers"})
    return vmapped(jax.random.split(key, num))


def run_stacked(layers: nnx.Module, step: Callable, x: jax.Array, xs: Any, *, scan: bool,
                remat: str | None) -> tuple[jax.Array, Any]:
    """Apply stacked layers in order: `x, y_i = step(layer_i, x, xs_i)`; returns (x, stacked y).

    `scan=True` traces one layer under `jax.lax.scan` (compile time independent of depth);
    `scan=False` unrolls a Python loop over the same parameters. `remat` wraps each layer in
    `jax.checkpoint` with the named policy.
    """
    graphdef, params = nnx.split(layers)

    def body(carry, layer):
        layer_params, layer_xs = layer
        carry, y = step(nnx.merge(graphdef, layer_params), shard_rows(carry), layer_xs)
        return shard_rows(carry), y

    if remat is not None:
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        return jax.lax.scan(body, x, (params, xs))
    num = jax.tree.leaves(params)[0].shape[0]
    ys = []
    for i in range(num):
        x, y = body(x, jax.tree.map(lambda a, i=i: a[i], (params, xs)))
        ys.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)


class StaticConfig:
    """A transformers config held as static module data, compared and hashed by its fields, so a
    model's graphdef can be a static argument of `jax.jit`. Fields that only record where the
    config came from, or the stored weights' dtype, are left out: the same model loaded from two
    directories compiles once."""

    BOOKKEEPING = ("_name_or_path", "_commit_hash", "architectures", "transformers_version",
                   "dtype", "torch_dtype")

    def __init__(self, config: Any):
        self.config = config
        fields = {k: v for k, v in config.to_dict().items() if k not in self.BOOKKEEPING}
        self.key = json.dumps(fields, sort_keys=True, default=str)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StaticConfig) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


class LanguageModel(nnx.Module):
    """What every model keeps besides its layers: its config (static, see StaticConfig) and how
    it runs: the compute dtype, scan over the stacked layers or not, the remat policy, and
    whether its output layer asks for the fused loss gradient (models/output.py). Each model
    still spells out create_model's keyword arguments, so its constructor reads alone."""

    def __init__(self, config: Any, *, dtype: Any, scan_layers: bool, remat: str | None,
                 fused_loss: bool = False):
        self.static_config = StaticConfig(config)
        self.dtype = compute_dtype(dtype)
        self.scan_layers = bool(scan_layers)
        self.remat = check_remat(remat)
        self.fused_loss = bool(fused_loss)

    @property
    def config(self) -> Any:
        return self.static_config.config


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(dtype: Any) -> Any:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in COMPUTE_DTYPES:
        raise ModelError(f"unsupported dtype {dtype!r}; use one of {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


@dataclasses.dataclass(frozen=True)
class TorchTensor:
    """Where one of our parameters lives in a PyTorch transformers state dict.

    `path` is the dotted path in `nnx.state(model, nnx.Param)`. A `{i}` in the names marks a
    stacked layer parameter (leading [n_layer] axis here, one tensor per layer there). Several
    names are concatenated along the output axis (RoBERTa's query/key/value -> our fused qkv).
    `linear`: stored [out, in] (torch nn.Linear), i.e. transposed from our [in, out].
    `copies`: further names written on export with the same value (never read on import).
    """

    path: str
    names: tuple[str, ...]
    linear: bool = False
    copies: tuple[str, ...] = ()
