"""The compiled train and eval steps over a device mesh with `data` and `fsdp` axes.

Batches are split along their batch axis over both axes (every device gets its own rows).
Parameters and optimizer state are sharded along `fsdp` (fully sharded data parallelism: each
device of an fsdp group holds 1/fsdp of every array; XLA gathers the weights where they are
used and reduces the gradients onto the shards that hold them) and replicated along `data`. With the default mesh (all
devices on `data`, fsdp = 1) everything is replicated: plain data parallelism.

All placement comes from `state_sharding` and `batch_sharding`. The models name their parameters'
axes with logical names (flax_lm/models/layers.py); LOGICAL_AXIS_RULES maps those names to mesh
axes, as MaxText's logical_axis_rules do. The mesh uses Auto axis types: inputs and outputs carry
explicit NamedShardings and XLA propagates them through the step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.linen import logical_axis_rules
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_lm.errors import UserError
from flax_lm.models.layers import ACTIVATION_BATCH, mesh_spec

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # a batch's rows are split over every device
# Logical axis name (as the models name their parameters' axes) -> the mesh axis sharding it.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("layers", None),  # the stacked layers' axis: lax.scan walks it, so it is never split
    ("vocab", None),  # embedding rows are gathered by token id: their width is split instead
    ("embed", FSDP_AXIS),
    ("heads", FSDP_AXIS),
    ("mlp", FSDP_AXIS),
    (ACTIVATION_BATCH, BATCH_AXES),  # activations' rows, split as the batch's (layers.shard_rows)
)
Batch = dict[str, jax.Array]


class TrainState(NamedTuple):
    """Everything a train step changes (and a checkpoint holds), as one pytree."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # uint32 key data of jax.random.key(seed); dropout keys derive from it and step


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
    """Axis sizes from a --mesh value such as "data=2,fsdp=4" for `num_devices` devices.

    An axis given as -1 or without a size takes the devices the others leave; so does `data`
    when it is not named. Unnamed axes have size 1; the sizes must multiply to `num_devices`."""
    sizes: dict[str, int] = {}
    rest = None
    for item in (spec or "").split(","):
        name, has_size, size = (part.strip() for part in item.partition("="))
        if not name and not has_size:
            continue
        if name not in MESH_AXES:
            raise mesh_error(spec, f"unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
        if name in sizes or name == rest:
            raise mesh_error(spec, f"axis {name!r} is given twice")
        if not has_size or size == "-1":
            if rest is not None:
                raise mesh_error(spec, f"only one axis may take the rest ({rest!r} and {name!r})")
            rest = name
        elif size.isdigit() and int(size) > 0:
            sizes[name] = int(size)
        else:
            raise mesh_error(spec, f"size {size!r} of {name!r} is not a positive integer or -1")
    if rest is None and DATA_AXIS not in sizes:
        rest = DATA_AXIS
    named = math.prod(sizes.values())
    if rest is not None:
        if num_devices % named:
            raise mesh_error(spec, f"{named} devices of the named axes do not divide "
                                   f"the {num_devices} devices")
        sizes[rest] = num_devices // named
    if math.prod(sizes.values()) != num_devices:
        raise mesh_error(spec, f"the axes make {math.prod(sizes.values())} devices, "
                               f"but there are {num_devices}")
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def mesh_error(spec: str | None, reason: str) -> UserError:
    return UserError(f"--mesh {spec!r}: {reason} (e.g. --mesh data=2,fsdp=4)")


def make_mesh(devices: list | None = None, spec: str | None = None) -> Mesh:
    """The (data, fsdp) mesh over all devices (of every process) as `spec` (--mesh) lays it out;
    by default all devices on `data`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have the logical names `axes`: each mesh
    axis shards the first dimension whose rule names it and whose size it divides. A dimension
    the mesh axis does not divide stays whole (replicated) on every device."""
    return mesh_spec(axes, shape, LOGICAL_AXIS_RULES, mesh.shape)


def state_sharding(mesh: Mesh, state: Any) -> Any:
    """Sharding of every leaf of a state pytree (parameters, a TrainState, abstract or not).

    A parameter's comes from its logical axis names; its optimizer moments are Variables of the
    same kind and names (optax maps over the parameters), so they follow it. Leaves without
    names, or whose rank differs from the names' (scalars, step, RNG, Adafactor's factored
    moments) are replicated."""

    def sharding(leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            axes = leaf.get_metadata().get("out_sharding")
            value = leaf.get_value()
            spec = PartitionSpec()
            if axes and len(axes) == np.ndim(value):
                spec = logical_spec(tuple(axes), np.shape(value), mesh)
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Split axis `batch_axis` of an `ndim`-dimensional batch array over every device."""
    spec: list[Any] = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def make_put(mesh: Mesh, batch_axis: int) -> Callable[[dict[str, np.ndarray]], Batch]:
    """Host batch -> global device arrays, split on `batch_axis`. Each process passes the rows
    that belong to its devices (`process_rows`); on one host that is the whole batch."""

    def put(batch: dict[str, np.ndarray]) -> Batch:
        out = {}
        for key, value in batch.items():
            global_shape = list(value.shape)
            global_shape[batch_axis] *= jax.process_count()
            sharding = batch_sharding(mesh, value.ndim, batch_axis)
            out[key] = jax.make_array_from_process_local_data(sharding, value, tuple(global_shape))
        return out

    return put


def process_rows(batch: dict[str, np.ndarray], batch_axis: int) -> dict[str, np.ndarray]:
    """This process's contiguous share of a global host batch."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return batch
    return {k: np.array_split(v, count, axis=batch_axis)[index] for k, v in batch.items()}


def new_state(params: nnx.State, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """The TrainState at step 0 (not yet placed on devices)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def init_state(
    params: nnx.State, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh
) -> TrainState:
    """The TrainState at step 0, laid out by `state_sharding`: the optimizer state is made in
    place on the devices, each one creating only its shards."""

    def fresh(params: nnx.State) -> TrainState:
        return new_state(params, optimizer, seed)

    shardings = state_sharding(mesh, jax.eval_shape(fresh, params))
    return jax.jit(fresh, out_shardings=shardings)(jax.device_put(params, shardings.params))


def state_shapes(
    params: nnx.State, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh
) -> TrainState:
    """What `init_state` would place, as shapes with their shardings, allocating nothing:
    `params` may be shapes too. For compiling for devices this process cannot use."""
    state = jax.eval_shape(lambda p: new_state(p, optimizer, seed), params)
    return with_shardings(state, state_sharding(mesh, state))


def batch_shapes(batch: dict[str, np.ndarray], mesh: Mesh, batch_axis: int) -> Batch:
    """What `make_put` would place for this (global) host batch, as shapes with shardings."""
    return {
        key: jax.ShapeDtypeStruct(
            value.shape, value.dtype, sharding=batch_sharding(mesh, value.ndim, batch_axis)
        )
        for key, value in batch.items()
    }


def with_shardings(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        shapes,
        shardings,
    )


def make_train_step(
    graphdef: nnx.GraphDef,
    objective,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """One optimizer step over a batch of shape [accumulation, microbatch, ...].

    Gradients of the summed loss are accumulated over the microbatches with lax.scan and divided
    by the number of targets of the whole batch, so any split into devices and microbatches
    gives the gradient of the global mean loss. Metrics stay on device as sums. One microbatch
    skips the loop: XLA:CPU runs a one-trip loop slower than its body alone."""

    def microbatch_loss(params, batch, dropout_rng):
        terms = objective.terms(nnx.merge(graphdef, params), batch, dropout_rng)
        return terms["loss_sum"], terms

    grad_fn = jax.grad(microbatch_loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        num_micro = next(iter(batch.values())).shape[0]
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        micro_rngs = jax.random.split(step_rng, num_micro)

        first = (jax.tree.map(lambda x: x[0], batch), micro_rngs[0])
        if num_micro == 1:
            grads, terms = grad_fn(state.params, *first)
        else:
            def accumulate(totals, micro_inputs):
                grads_and_terms = grad_fn(state.params, *micro_inputs)
                return jax.tree.map(jnp.add, totals, grads_and_terms), None

            shapes = jax.eval_shape(grad_fn, state.params, *first)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (grads, terms), _ = jax.lax.scan(accumulate, zeros, (batch, micro_rngs))
        grads = jax.tree.map(lambda g: g / jnp.maximum(terms["num_targets"], 1.0), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **terms,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
        }
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, objective) -> Callable[[nnx.State, Batch], dict]:
    """Loss, target and correct-prediction sums of one eval batch (dropout off)."""

    def eval_step(params: nnx.State, batch: Batch) -> dict:
        return objective.terms(nnx.merge(graphdef, params), batch)

    return eval_step


def abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a pytree of arrays, for ahead-of-time compilation."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def compile_ahead(
    fn: Callable, example_args: tuple, mesh: Mesh, *, donate_argnums: tuple = (),
    out_shardings: Any = None,
) -> tuple[Callable, float]:
    """Compile `fn` for the shapes and shardings of `example_args`; return it and seconds taken.
    Traced with `mesh` set and LOGICAL_AXIS_RULES, so the models' activation constraints apply."""
    start = time.perf_counter()
    jitted = jax.jit(fn, donate_argnums=donate_argnums, out_shardings=out_shardings)
    with jax.set_mesh(mesh), logical_axis_rules(LOGICAL_AXIS_RULES):
        compiled = jitted.lower(*abstract(example_args)).compile()
    return compiled, time.perf_counter() - start


def compile_train_step(
    train_step: Callable, state: TrainState, batch: Batch, mesh: Mesh
) -> tuple[Callable, float]:
    """The train step compiled once: state donated and kept as `state_sharding` lays it out,
    metrics replicated."""
    metrics_sharding = NamedSharding(mesh, PartitionSpec())
    return compile_ahead(
        train_step,
        (state, batch),
        mesh,
        donate_argnums=(0,),
        out_shardings=(state_sharding(mesh, state), metrics_sharding),
    )


def compile_eval_step(
    eval_step: Callable, params: nnx.State, batch: Batch, mesh: Mesh
) -> tuple[Callable, float]:
    return compile_ahead(
        eval_step, (params, batch), mesh, out_shardings=NamedSharding(mesh, PartitionSpec())
    )
