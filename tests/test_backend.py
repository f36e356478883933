"""What differs between platforms (flax_lm/backend.py): the platform JAX will start, decided
before it starts; JAX's devices named as the table names them; and the train step's
one-microbatch path, which gives the same step with or without the accumulation loop."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import Bigram
from flax import nnx
from transformers import GPT2Config

from flax_lm.backend import Machine, device_platform, skip_unused_tpu_plugin, startup_platform
from flax_lm.models import create_model
from flax_lm.train.args import TrainConfig, resolve_defaults
from flax_lm.train.build import model_options
from flax_lm.train.objectives import CausalLM
from flax_lm.train.step import TrainState, make_train_step

CPU_ONLY = Machine(tpu_chips=False, libtpu=False, nvidia_gpu=False, cuda_plugin=False,
                   amd_gpu=False, rocm_plugin=False)  # fmt: skip


@pytest.mark.parametrize("environ, machine, expected", [
    ({}, {}, "cpu"),
    ({}, {"libtpu": True}, "cpu"),  # jax[tpu] installed on a machine without TPU chips
    ({}, {"libtpu": True, "tpu_chips": True}, "tpu"),
    ({}, {"tpu_chips": True}, "cpu"),  # no libtpu: JAX cannot use them
    ({}, {"nvidia_gpu": True, "cuda_plugin": True}, "cuda"),
    ({}, {"nvidia_gpu": True}, "cpu"),  # a GPU but JAX without its CUDA plugin
    ({}, {"cuda_plugin": True}, "cpu"),  # the plugin installed, no GPU
    ({}, {"amd_gpu": True, "rocm_plugin": True}, "rocm"),
    ({"JAX_PLATFORMS": "cpu"}, {"nvidia_gpu": True, "cuda_plugin": True}, "cpu"),
    ({"JAX_PLATFORMS": "cuda,cpu"}, {}, "cuda"),
    ({"JAX_PLATFORMS": "gpu"}, {"rocm_plugin": True}, "rocm"),
    ({"JAX_PLATFORMS": ""}, {"libtpu": True, "tpu_chips": True}, "tpu"),
])  # fmt: skip
def test_the_platform_jax_will_start_is_read_from_environment_and_machine(
    environ, machine, expected
):
    fields = {**CPU_ONLY.__dict__, **machine}
    assert startup_platform(environ, Machine(**fields)) == expected


def test_the_platform_decided_before_jax_starts_is_the_one_it_starts():
    """On this machine, with JAX left to choose (no JAX_PLATFORMS): libtpu may be installed
    where no TPU is, as with jax[tpu] on a CPU machine."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    script = ("import os; from flax_lm.backend import platform, startup_platform; "
              "print(startup_platform(os.environ)); print(platform())")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, started = done.stdout.split()
    assert before == started


@pytest.mark.parametrize("platform, version, expected", [
    ("cpu", "", "cpu"),
    ("tpu", "", "tpu"),
    ("gpu", "cuda 12080", "cuda"),
    ("gpu", "rocm 6.4.1", "rocm"),
])  # fmt: skip
def test_jax_devices_are_named_by_platform(platform, version, expected):
    device = SimpleNamespace(platform=platform, client=SimpleNamespace(platform_version=version))
    assert device_platform(device) == expected


VOCAB, ROWS, SEQ = 32, 4, 8


def test_one_microbatch_steps_alike_with_or_without_the_accumulation_loop():
    """One microbatch takes the gradient directly; the same rows twice, as two microbatches, go
    through the accumulation loop: the mean loss is the same, and so is the step."""
    graphdef, params = nnx.split(Bigram(VOCAB), nnx.Param)
    sgd = optax.sgd(1.0)
    ids = np.random.default_rng(0).integers(0, VOCAB, (1, ROWS, SEQ)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
    twice = {key: np.concatenate([value, value]) for key, value in batch.items()}
    state = TrainState(jnp.zeros((), jnp.int32), params, sgd.init(params),
                       jax.random.key_data(jax.random.key(0)))  # fmt: skip
    step = jax.jit(make_train_step(graphdef, CausalLM(), sgd, optax.constant_schedule(1.0)))
    (direct, direct_metrics), (looped, looped_metrics) = step(state, batch), step(state, twice)
    for got, want in zip(jax.tree.leaves(looped), jax.tree.leaves(direct), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for name in ("loss_sum", "num_targets"):
        np.testing.assert_allclose(looped_metrics[name], 2 * direct_metrics[name], rtol=1e-6)
    np.testing.assert_allclose(looped_metrics["grad_norm"], direct_metrics["grad_norm"], rtol=1e-6)
    assert not np.allclose(direct.params["table"]["embedding"], params["table"]["embedding"])


@pytest.mark.parametrize("environ, machine, skipped", [
    ({}, {"libtpu": True}, True),  # jax[tpu] on a CPU machine: JAX would end on the CPU anyway
    ({}, {}, False),  # nothing to skip
    ({}, {"libtpu": True, "tpu_chips": True}, False),
    ({}, {"libtpu": True, "nvidia_gpu": True, "cuda_plugin": True}, False),
    ({"JAX_PLATFORMS": ""}, {"libtpu": True}, False),  # the user's choice, even an empty one
    ({"JAX_PLATFORMS": "tpu"}, {"libtpu": True}, False),
])  # fmt: skip
def test_an_installed_libtpu_is_skipped_only_where_jax_would_start_on_the_cpu(
    environ, machine, skipped
):
    before = dict(environ)
    assert skip_unused_tpu_plugin(environ, replace(CPU_ONLY, **machine)) is skipped
    assert environ == ({**before, "JAX_PLATFORMS": "cpu"} if skipped else before)


@pytest.mark.parametrize("platform, version, flag, scanned", [
    ("cpu", "", None, True),
    ("tpu", "", None, True),
    ("gpu", "cuda 12080", None, False),  # GPUs unroll: see flax_lm/backend.py
    ("gpu", "cuda 12080", True, True),  # --scan_layers wins over the platform
    ("cpu", "", False, False),  # --no_scan_layers
])  # fmt: skip
def test_the_layer_loop_is_the_platforms_unless_a_flag_names_one(platform, version, flag,
                                                                  scanned):
    device = SimpleNamespace(platform=platform, client=SimpleNamespace(platform_version=version))
    mesh = SimpleNamespace(devices=np.array([device]))
    cfg = resolve_defaults(TrainConfig(scan_layers=flag))
    options = model_options(cfg, mesh)
    assert options["platform"] == device_platform(device)
    model = nnx.eval_shape(lambda: create_model(GPT2Config(n_embd=32, n_layer=2, n_head=2,
                                                           vocab_size=64), **options))
    assert model.scan_layers is scanned
