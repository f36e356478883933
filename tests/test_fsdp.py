"""Fully sharded data parallelism on 8 host devices: a data=2,fsdp=4 mesh trains like pure data
parallelism (CLM and MLM), its checkpoints resume exactly on the same mesh and onto another mesh,
and fsdp=8 holds 1/8 of the parameter and optimizer bytes on each device, from a fresh model
created sharded (the same on every mesh).

The runs need 8 devices, so one subprocess makes them all (the real training CLI, in one
process so that startup is paid once) and measures what needs the devices; the tests compare
its output directories and measurements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CACHE_EVERY_COMPILE, host_devices
from safetensors.numpy import load_file
from test_resume import TINY_MODELS, metrics_records, run_argv

from flax_lm.commands.train import main
from flax_lm.train.step import make_mesh, parse_mesh

# The tests of the runs on 8 devices (one subprocess training six times): the longest fixture of
# the suite, so left out of `pytest -m 'not slow'`.
EIGHT_DEVICE_RUNS = pytest.mark.slow
TOLERANCE = 1e-5  # float32: sharding changes only the order of the gradient reductions
FSDP_MESH, OTHER_MESH = "data=2,fsdp=4", "data=8"  # the other one reuses the dp run's compile
RESUME_STEP = 6  # a checkpoint of run_argv's (saved every 3 steps, 10 steps in all)

DRIVER = """
import dataclasses, json, math, shutil, sys
from pathlib import Path

import jax, numpy as np, optax
from flax import nnx
from transformers import GPT2Config

from flax_lm.models import create_model
from flax_lm.train import checkpoint
from flax_lm.commands.train import main
from flax_lm.train.args import TrainConfig, parse_config
from flax_lm.train.build import build_params, fresh_params, model_shapes
from flax_lm.train.optim import make_training_optimizer
from flax_lm.train.prepare import prepare_model
from flax_lm.train.step import init_state, make_mesh, state_shapes

runs, resume_step, tiny = json.loads(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
for objective, argv in runs:
    assert main(argv, objective=objective) == 0, argv


def restored(directory, step, mesh):
    optimizer = make_training_optimizer(TrainConfig(weight_decay=0.01), optax.constant_schedule(
        1e-3), params)  # the structure of the runs' optimizer state
    like = state_shapes(params, optimizer, 0, mesh)  # restored onto it, nothing made first
    manager = checkpoint.open_manager(Path(directory), create=False)
    try:
        return checkpoint.restore(manager, step, like)[0]
    finally:
        manager.close()


def bytes_per_device(tree):
    held = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return max(held.values())


def whole_bytes(tree):
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


report = {}
fsdp_checkpoints = sys.argv[4]
params = nnx.split(nnx.eval_shape(lambda: create_model(GPT2Config(**tiny["clm"]))), nnx.Param)[1]
# The tiny CLM model's checkpoint restored onto three meshes: the values must not change.
states = {spec: restored(fsdp_checkpoints, resume_step, make_mesh(spec=spec))
          for spec in ("data=2,fsdp=4", "fsdp=8", "data=8")}
first = jax.tree.leaves(states["data=2,fsdp=4"])
report["restored_equal"] = {
    spec: all(np.array_equal(np.asarray(a), np.asarray(b))
              for a, b in zip(first, jax.tree.leaves(state), strict=True))
    for spec, state in states.items()}
# each device's shard of the MLP kernels [layers, embed, mlp] and of their two AdamW moments
report["restored_shards"] = {
    spec: [list(leaf.addressable_shards[0].data.shape) for leaf in jax.tree.leaves(state)
           if leaf.shape == (2, 32, 128)] for spec, state in states.items()}
# Parameters + AdamW state of a small GPT-2: whole (what each device holds replicated) and
# the most any device holds fully sharded over 8 devices.
params = nnx.split(create_model(GPT2Config(**tiny["memory"])), nnx.Param)[1]
report["bytes_per_device"] = {
    "data=8": whole_bytes(state_shapes(params, optax.adamw(1e-3), 0, make_mesh(spec="data=8"))),
    "fsdp=8": bytes_per_device(init_state(params, optax.adamw(1e-3), 0, make_mesh(spec="fsdp=8")))}
# A fresh model made by the runs' jitted initializer on two meshes, and what creating one
# holds on each device with fsdp=8 (its shards plus the initializer's temporaries).
prepared = prepare_model(parse_config(runs[0][1], "clm"), "clm", 8)
inits = [jax.tree.leaves(build_params(prepared, make_mesh(spec=spec))[1])
         for spec in ("data=8", "data=2,fsdp=4")]
report["same_init"] = all(np.array_equal(a, b) for a, b in zip(*inits, strict=True))
memory_model = dataclasses.replace(prepared, model_config=GPT2Config(**tiny["memory"]))
mesh = make_mesh(spec="fsdp=8")
shapes = nnx.split(model_shapes(memory_model, mesh), nnx.Param)[1]
creation = fresh_params(memory_model, mesh, shapes).lower().compile().memory_analysis()
report["creation_bytes"] = {
    "whole": whole_bytes(shapes),
    "outputs": creation.output_size_in_bytes, "temporaries": creation.temp_size_in_bytes}
Path(sys.argv[5]).write_text(json.dumps(report))
"""
TINY_CONFIGS = {  # GPT2Config arguments: the runs' CLM model, and a larger one for the bytes
    "clm": {k: int(v) for k, v in (kv.split("=") for kv in TINY_MODELS["clm"][3].split(","))},
    "memory": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "vocab_size": 1024},
}


def mesh_argv(objective, code_corpus, tokenizer_dir, out: Path, cache: Path, mesh: str | None):
    """run_argv's run with a global batch of 8 (one row a device); MLM without evaluation (the
    CLM runs check the eval step), which saves compiling it twice."""
    argv = run_argv(objective, code_corpus, tokenizer_dir, out, cache)
    only_train = ["--do_train"] if objective == "mlm" else []
    return [*argv, "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "8",
            *only_train, *(["--mesh", mesh] if mesh else [])]  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_runs(code_corpus, tiny_tokenizer_dir, tmp_path_factory):
    """Output dirs of each objective's run on data=8 ("dp") and on data=2,fsdp=4 ("fsdp"); the
    CLM fsdp run resumed from its step-6 checkpoint on the same mesh and on data=8; and the
    driver's measurements."""
    root = tmp_path_factory.mktemp("fsdp")
    cache = root / "jax_cache"
    dirs, runs = {}, []
    for objective in ("clm", "mlm"):
        for name, mesh in (("dp", None), ("fsdp", FSDP_MESH)):
            dirs[objective, name] = root / f"{objective}-{name}"
            runs.append((objective, mesh_argv(objective, code_corpus, tiny_tokenizer_dir,
                                              dirs[objective, name], cache, mesh)))
    saved = dirs["clm", "fsdp"] / "checkpoints" / str(RESUME_STEP)
    for name, mesh in (("resumed-same", FSDP_MESH), ("resumed-other", OTHER_MESH)):
        dirs["clm", name] = root / f"clm-{name}"
        argv = mesh_argv("clm", code_corpus, tiny_tokenizer_dir, dirs["clm", name], cache, mesh)
        runs.append(("clm", [*argv, "--resume_from_checkpoint", str(saved)]))
    report = root / "report.json"
    # every program cached: the resumed runs load all of theirs (the step, the eval step, the
    # initializer) from the runs on the same meshes before them instead of compiling them again
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **CACHE_EVERY_COMPILE,
           **host_devices(8)}  # fmt: skip
    command = [sys.executable, "-c", DRIVER, json.dumps(runs), str(RESUME_STEP),
               json.dumps(TINY_CONFIGS), str(saved.parent), str(report)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return dirs, json.loads(report.read_text())


def assert_close_runs(expected: Path, actual: Path, tolerance: float = TOLERANCE) -> None:
    """Same losses (every step, eval) and final parameters within `tolerance`."""
    want, got = (load_file(str(d / "model.safetensors")) for d in (expected, actual))
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=tolerance, err_msg=name)
    records = [metrics_records(d) for d in (expected, actual)]
    assert [r["step"] for r in records[1]] == [r["step"] for r in records[0]]
    for a, b in zip(*records, strict=True):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=tolerance), (a["step"], key)


@EIGHT_DEVICE_RUNS
@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_fsdp_trains_like_data_parallelism(fsdp_runs, objective):
    dirs, _ = fsdp_runs
    assert_close_runs(dirs[objective, "dp"], dirs[objective, "fsdp"])
    train = [r["step"] for r in metrics_records(dirs[objective, "fsdp"]) if "loss" in r]
    assert train == list(range(1, 11))


@EIGHT_DEVICE_RUNS
def test_fsdp_checkpoint_resumes_exactly_on_the_same_mesh(fsdp_runs):
    dirs, _ = fsdp_runs
    uninterrupted, resumed = dirs["clm", "fsdp"], dirs["clm", "resumed-same"]
    for name, array in load_file(str(uninterrupted / "model.safetensors")).items():
        np.testing.assert_array_equal(load_file(str(resumed / "model.safetensors"))[name], array)
    later = [r for r in metrics_records(uninterrupted) if r["step"] > RESUME_STEP]
    assert metrics_records(resumed) == later
    results = [json.loads((d / "train_results.json").read_text()) for d in (uninterrupted, resumed)]
    assert results[1]["train_loss"] == results[0]["train_loss"]


@EIGHT_DEVICE_RUNS
def test_fsdp_checkpoint_resumes_on_another_mesh(fsdp_runs):
    """Restoring onto another mesh changes no value: the state read onto fsdp=8 or data=8 is the
    saved one bit for bit, laid out for that mesh; training on from it (on data=8) stays within
    the tolerance of the uninterrupted run (only the order of reductions differs)."""
    dirs, report = fsdp_runs
    assert report["restored_equal"] == {"data=2,fsdp=4": True, "fsdp=8": True, "data=8": True}
    assert report["restored_shards"] == {  # the MLP kernels and their moments, per device
        "data=2,fsdp=4": [[2, 8, 128]] * 3, "fsdp=8": [[2, 4, 128]] * 3,
        "data=8": [[2, 32, 128]] * 3}
    uninterrupted, resumed = dirs["clm", "fsdp"], dirs["clm", "resumed-other"]
    want, got = (load_file(str(d / "model.safetensors")) for d in (uninterrupted, resumed))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOLERANCE, err_msg=name)
    later = [r for r in metrics_records(uninterrupted) if r["step"] > RESUME_STEP]
    for a, b in zip(later, metrics_records(resumed), strict=True):
        assert b.get("loss", b.get("eval_loss")) == pytest.approx(
            a.get("loss", a.get("eval_loss")), abs=TOLERANCE)


@EIGHT_DEVICE_RUNS
def test_fsdp_holds_an_eighth_of_the_state_per_device(fsdp_runs):
    _, report = fsdp_runs
    replicated, sharded = report["bytes_per_device"]["data=8"], report["bytes_per_device"]["fsdp=8"]
    assert sharded <= 1.05 * replicated / 8, (sharded, replicated)


@EIGHT_DEVICE_RUNS
def test_a_fresh_model_is_created_sharded_and_alike_on_every_mesh(fsdp_runs):
    """The same seed gives the same parameters, bit for bit, on data=8 and data=2,fsdp=4; with
    fsdp=8 each device creates only its eighth: its shards and the initializer's temporaries
    together stay far below one whole copy of the parameters."""
    _, report = fsdp_runs
    assert report["same_init"] is True
    creation = report["creation_bytes"]
    assert creation["outputs"] <= 1.05 * creation["whole"] / 8, creation
    assert creation["outputs"] + creation["temporaries"] < creation["whole"] / 2, creation


@pytest.mark.parametrize("spec", ["data=3", "tensor=8", "fsdp=0", "data,fsdp", "fsdp=x"])
def test_a_bad_mesh_is_one_line_naming_the_flag(spec):
    with pytest.raises(Exception) as caught:
        parse_mesh(spec, 8)
    message = str(caught.value)
    assert "--mesh" in message and repr(spec) in message and "\n" not in message


def test_a_mesh_that_does_not_fit_the_devices_stops_the_run_before_it_writes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--train_file", str(tmp_path), "--mesh", "data=2,fsdp=2"]
    assert main(argv, objective="clm") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--mesh 'data=2,fsdp=2'" in lines[0] and "4" in lines[0]
    assert not out.exists()


def test_mesh_sizes():
    assert parse_mesh(None, 8) == {"data": 8, "fsdp": 1}
    assert parse_mesh("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4}
    assert parse_mesh("fsdp=4", 8) == {"data": 2, "fsdp": 4}
    assert parse_mesh("fsdp=-1", 8) == parse_mesh("fsdp", 8) == {"data": 1, "fsdp": 8}
    assert make_mesh(spec="fsdp=-1").shape == {"data": 1, "fsdp": 1}  # this process: 1 device
