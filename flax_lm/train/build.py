"""The model, optimizer, train state and train step of a run, built in one place: the training
loop runs them and `flax-lm plan` compiles them for devices it may not have, so the plan is the
step training runs (same model options, optimizer, state layout, batch layout and shardings)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from flax_lm.backend import device_platform
from flax_lm.models import create_model, settled_attention
from flax_lm.models.attention import IMPLEMENTATIONS, AttentionChoice
from flax_lm.models.hf_io import load_model
from flax_lm.train.args import AUTO, TrainConfig
from flax_lm.train.data.feed import TRAIN_BATCH_AXIS, split_microbatches
from flax_lm.train.optim import make_schedule, make_training_optimizer
from flax_lm.train.prepare import Prepared
from flax_lm.train.step import (
    Batch,
    TrainState,
    batch_shapes,
    make_train_step,
    state_shapes,
    state_sharding,
)


def model_options(cfg: TrainConfig, mesh: Mesh) -> dict[str, Any]:
    """The model's options, for the platform of the mesh's devices, which for a plan need not be
    this process's (a TPU or GPU compiled for on a CPU gets that platform's attention and layer
    loop)."""
    remat = None if cfg.remat == AUTO else cfg.remat  # auto: resolved before, or a CPU's none
    return {"dtype": cfg.dtype, "scan_layers": cfg.scan_layers, "remat": remat,
            "attention": cfg.attn_implementation,
            "platform": device_platform(mesh.devices.flat[0])}


def settle_attention(p: Prepared, mesh: Mesh, *,
                     try_kernel: bool = True) -> tuple[Prepared, AttentionChoice]:
    """The run with its attention implementation named, and why: the platform's (or the
    flag's), unless that fast kernel cannot take the run's length or (`try_kernel`: tried on a
    small input on this machine) fails or errs, then XLA's. Every process takes process 0's: the
    processes must compile one program. A plan, compiling for devices it need not have, does
    not try the kernel."""
    cfg = p.cfg
    choice = settled_attention(p.model_config, dtype=cfg.dtype, requested=cfg.attn_implementation,
                               platform=device_platform(mesh.devices.flat[0]), length=p.seq_len,
                               try_kernel=try_kernel)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        index = IMPLEMENTATIONS.index(choice.implementation)
        first = IMPLEMENTATIONS[int(multihost_utils.broadcast_one_to_all(np.int32(index)))]
        if first != choice.implementation:
            choice = AttentionChoice(first, f"process 0's choice (here: {choice.reason})")
    named = dataclasses.replace(cfg, attn_implementation=choice.implementation)
    return dataclasses.replace(p, cfg=named), choice


def build_model(p: Prepared, mesh: Mesh) -> nnx.Module:
    """The model a run starts from: --model_name_or_path's weights, or a fresh one."""
    options = model_options(p.cfg, mesh)
    if p.model_dir is not None:
        return load_model(p.model_dir, **options)
    return create_model(p.model_config, seed=p.cfg.seed, **options)


def build_params(p: Prepared, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graphdef and its parameters laid out on `mesh` by `state_sharding`.

    A fresh model is made by one jitted initializer whose outputs have those shardings: each
    device computes only its own shards (threefry is partitionable), so no device ever holds
    the whole model, and the values are the same on every mesh. (They can differ in the last
    bit from `create_model` run eagerly: XLA fuses the scaling into the random draws.)"""
    if p.model_dir is not None:
        graphdef, params = nnx.split(build_model(p, mesh), nnx.Param)
        return graphdef, jax.device_put(params, state_sharding(mesh, params))
    graphdef, shapes = nnx.split(model_shapes(p, mesh), nnx.Param)
    return graphdef, fresh_params(p, mesh, shapes)()


def fresh_params(p: Prepared, mesh: Mesh, shapes: nnx.State) -> Callable[[], nnx.State]:
    """The jitted initializer of a fresh model's parameters, sharded as `shapes` are on `mesh`."""

    def create() -> nnx.State:
        return nnx.split(build_model(p, mesh), nnx.Param)[1]

    return jax.jit(create, out_shardings=state_sharding(mesh, shapes))


def model_shapes(p: Prepared, mesh: Mesh) -> nnx.Module:
    """`build_model`'s model as shapes only (a pretrained model has its config's shapes)."""
    options = model_options(p.cfg, mesh)
    return nnx.eval_shape(lambda: create_model(p.model_config, seed=p.cfg.seed, **options))


@dataclass
class StepParts:
    """What a train step is made of, and the step (a pure function, not yet compiled)."""

    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict]]


def step_parts(p: Prepared, graphdef: nnx.GraphDef, params: nnx.State) -> StepParts:
    """The optimizer, learning-rate schedule and train step of the run `p` (params: arrays or
    shapes; only their structure and kinds matter)."""
    schedule = make_schedule(p.cfg, p.total_steps)
    optimizer = make_training_optimizer(p.cfg, schedule, params)
    train_step = make_train_step(graphdef, p.objective, optimizer, schedule)
    return StepParts(graphdef, optimizer, schedule, train_step)


def example_train_batch(p: Prepared) -> dict[str, np.ndarray]:
    """A host train batch with the shapes and dtypes of every real one (the token ids are 0),
    made by the run's objective from nothing but the flags: no corpus is read."""
    rows = p.global_batch_size
    examples = {"input_ids": np.zeros((rows, p.seq_len), np.int32)}
    batch = p.objective.make_batch(examples, np.random.default_rng(0))
    return split_microbatches(batch, p.cfg.gradient_accumulation_steps)


def abstract_step(p: Prepared, mesh: Mesh) -> tuple[Callable, TrainState, Batch]:
    """The run's train step with its state and batch as shapes with their shardings on `mesh`:
    nothing is allocated, so the mesh may be of devices this process cannot run on. Compile
    them with `compile_train_step`, as the training loop compiles its step."""
    graphdef, params = nnx.split(model_shapes(p, mesh), nnx.Param)
    parts = step_parts(p, graphdef, params)
    state = state_shapes(params, parts.optimizer, p.cfg.seed, mesh)
    batch = batch_shapes(example_train_batch(p), mesh, TRAIN_BATCH_AXIS)
    return parts.train_step, state, batch
