"""`flax-lm plan`: the step it compiles is the training command's (same memory, byte for byte),
it compiles for a TPU topology through libtpu on this CPU, and bad input gets one line."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import re
import sys

import jax
import pytest

from flax_lm.commands.plan import main as plan
from flax_lm.commands.train import main as train
from flax_lm.plan import (
    GPU_TARGETS,
    TPU_HBM_PER_CHIP,
    gpu_target,
    installed_cudnn,
    refused_for_memory,
    tpu_topology,
)
from flax_lm.train import step, trainer

TINY_GPT2 = "n_embd=32,n_layer=2,n_head=2,n_positions=64,vocab_size=512"
MEMORY_FIELDS = {
    "arguments": "argument_size_in_bytes",
    "outputs": "output_size_in_bytes",
    "aliased": "alias_size_in_bytes",
    "temporaries": "temp_size_in_bytes",
    "program": "generated_code_size_in_bytes",
}
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA_PLUGIN = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") is not None
                      for v in (12, 13))


def step_flags(tokenizer_dir) -> list[str]:
    """A tiny GPT-2 run's step settings: bfloat16, remat, two microbatches."""
    return [
        "--model_type", "gpt2", "--config_overrides", TINY_GPT2,
        "--tokenizer_name", str(tokenizer_dir), "--block_size", "32",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--dtype", "bfloat16", "--remat", "qkv_out",
    ]  # fmt: skip


def run_plan(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = plan(argv)
    return status, out.getvalue(), err.getvalue()


def keep_compiled_steps(monkeypatch, module) -> list:
    """The train steps `module` compiles from now on, kept in the list returned."""
    compiled_steps = []
    compile_train_step = module.compile_train_step

    def compile_and_keep(*args, **kwargs):
        compiled, seconds = compile_train_step(*args, **kwargs)
        compiled_steps.append(compiled)
        return compiled, seconds

    monkeypatch.setattr(module, "compile_train_step", compile_and_keep)
    return compiled_steps


def test_the_plan_is_the_memory_of_the_step_training_compiles(
    code_corpus, tiny_tokenizer_dir, tmp_path, monkeypatch
):
    compiled_steps = keep_compiled_steps(monkeypatch, trainer)
    flags = step_flags(tiny_tokenizer_dir)
    status = train([
        *flags, "--train_file", str(code_corpus.train), "--do_train", "--max_steps", "1",
        "--output_dir", str(tmp_path / "run"), "--report_to", "none",
        "--compilation_cache_dir", "none",
    ], objective="clm")  # fmt: skip
    assert status == 0 and len(compiled_steps) == 1
    trained = compiled_steps[0].memory_analysis()

    status, stdout, _ = run_plan([*flags, "--json"])
    assert status == 0
    result = json.loads(stdout)
    planned = result["per_device_bytes"]
    for ours, xla in MEMORY_FIELDS.items():
        assert planned[ours] == getattr(trained, xla), ours
    assert planned["total"] == (
        planned["arguments"] + planned["outputs"] - planned["aliased"]
        + planned["temporaries"] + planned["program"]
    )  # fmt: skip
    # the arguments are the state and the batch, and the step counter and RNG key (12 bytes)
    state_and_batch = planned["parameters"] + planned["optimizer_state"] + planned["batch"]
    assert 0 < planned["arguments"] - state_and_batch <= 12
    assert result["topology"] == "local" and result["fits"] is True
    assert result["settings"]["global_batch_size"] == 8 and result["settings"]["remat"] == "qkv_out"
    assert result["flops"]["matmul"] > result["flops"]["matmul_without_remat"] > 0 and result["compile_seconds"] > 0


def all_reduced_elements(hlo: str) -> list[int]:
    """Elements per device of every all-reduce in optimized HLO text (a tuple: its largest)."""
    sizes = []
    for line in hlo.splitlines():
        if " all-reduce(" in line or " all-reduce-start(" in line:
            result = line.split(" = ", 1)[1].split(" all-reduce", 1)[0]
            dims = re.findall(r"\[([\d,]*)\]", result)
            sizes.append(max(math.prod(int(d) for d in ds.split(",") if d) for ds in dims))
    return sizes


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: pip install -e '.[tpu]'")
@pytest.mark.parametrize("topology", ["v5e:2x2", "v4:2x2x1"])
def test_splash_attention_compiles_for_tpu_v4_and_later(tiny_tokenizer_dir, monkeypatch,
                                                         topology):
    """TPUs from v4 on take Pallas' splash kernels (forward, dq, dkv; causal, padded by segment
    ids), each device on its own rows: the attention gathers no activations across devices."""
    compiled_steps = keep_compiled_steps(monkeypatch, step)
    tiny = TINY_GPT2.replace("n_layer=2", "n_layer=1").replace("n_positions=64",
                                                                 "n_positions=128")
    # conftest asks for "highest" matmul precision (float32 parity tests), which Mosaic refuses
    # for the kernel's bfloat16 products (a training run at that setting finds so when it tries
    # the kernel, and takes XLA's attention); the plan compiles at JAX's default.
    with jax.default_matmul_precision("default"):
        status, stdout, stderr = run_plan([
            "--model_type", "gpt2", "--config_overrides", f"{tiny},attn_pdrop=0.0",
            "--tokenizer_name", str(tiny_tokenizer_dir), "--block_size", "128",
            "--per_device_train_batch_size", "1", "--dtype", "bfloat16", "--topology", topology,
            "--json",
        ])  # fmt: skip
    assert status == 0, stderr[-2000:]
    result = json.loads(stdout)
    assert result["devices"] == 4 and result["settings"]["attention"] == "splash"
    assert result["hbm_bytes"] == {"v5e:2x2": 16, "v4:2x2x1": 32}[topology] * 2**30  # a chip's
    program = compiled_steps[0].as_text()
    for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
        assert kernel in program, kernel
    assert "all-gather" not in program


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: pip install -e '.[tpu]'")
def test_a_train_step_compiles_for_a_tpu_v3_8_on_this_cpu(tiny_tokenizer_dir, monkeypatch):
    """On the mesh training would use (--mesh data=2,fsdp=4): parameters sharded 4 ways, and
    XLA:TPU runs it as FSDP: activations stay split by rows (each layer's weights gathered, its
    gradient reduced onto the shards), so nothing larger than a parameter is all-reduced. (Left
    to itself XLA split the activations on their width, 4 rows x 32 tokens x 128 hidden.)"""
    compiled_steps = keep_compiled_steps(monkeypatch, step)
    argv = [*step_flags(tiny_tokenizer_dir), "--mesh", "data=2,fsdp=4", "--topology", "v3-8"]
    status, stdout, _ = run_plan([*argv, "--json"])
    assert status == 0
    result = json.loads(stdout)
    assert (result["topology"], result["devices"], result["device_kind"]) == ("v3-8", 8, "TPU v3")
    assert 15 * 2**30 < result["hbm_bytes"] <= 16 * 2**30  # 16 GB of HBM, less XLA's reserve
    assert result["fits"] is True and result["settings"]["mesh"] == {"data": 2, "fsdp": 4}
    planned = result["per_device_bytes"]
    assert planned["temporaries"] > 0 and planned["program"] > 0
    assert planned["total"] < result["hbm_bytes"] / 100
    # float32 parameters, every width divisible by fsdp=4: a quarter of them on each device
    params = 512 * 32 + 64 * 32 + 2 * (4 * 32 * 32 + 2 * 32 * 128 + 13 * 32) + 2 * 32
    assert planned["parameters"] == 4 * params // 4
    largest_parameter = 512 * 32  # the token embeddings
    all_reduced = all_reduced_elements(compiled_steps[0].as_text())
    assert all_reduced and max(all_reduced) <= largest_parameter, all_reduced


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: pip install -e '.[tpu]'")
@pytest.mark.parametrize(("topology", "kind", "devices", "gib_per_device"), [
    ("v2:2x2", "TPU v2", 8, 8),  # a device per TensorCore: half of a chip's 16 GiB
    ("v3-8", "TPU v3", 8, 16),
    ("v5e:2x2", "TPU v5 lite", 4, 16),  # one core per chip
    ("v5p:2x2x1", "TPU v5", 4, 95),  # megacore: the chip is the device
    ("v6e:2x2", "TPU v6 lite", 4, 32),
])  # fmt: skip
def test_a_tpu_generation_has_its_published_hbm_per_device(topology, kind, devices,
                                                          gib_per_device):
    target = tpu_topology(topology)
    assert (target.devices[0].device_kind, len(target.devices)) == (kind, devices)
    assert target.memory_bytes == gib_per_device * 2**30
    assert TPU_HBM_PER_CHIP[kind] % target.memory_bytes == 0


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: pip install -e '.[tpu]'")
def test_a_program_too_large_for_the_hbm_is_refused_for_memory():
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    core = tpu_topology("v2:2x2").devices[0]
    rows = jax.ShapeDtypeStruct((2**16, 128), jnp.float32, sharding=SingleDeviceSharding(core))
    with pytest.raises(Exception) as refused:  # noqa: PT011 - the type is XLA's, by version
        # a 16 GiB product on a core of 8 GiB, held whole to be sorted
        jax.jit(lambda x: jnp.sort(x @ x.T, axis=0)[0]).lower(rows).compile()
    assert refused_for_memory(refused.value)
    assert not refused_for_memory(ValueError("RESOURCE_EXHAUSTED"))


def test_the_gpu_target_states_the_installed_cudnn(tmp_path, monkeypatch):
    """XLA is told the cuDNN of the installed wheel (as jax[cuda12] brings it), none without."""
    monkeypatch.setattr(sys, "path", [str(tmp_path)])  # where the distributions are looked for
    assert installed_cudnn() is None
    assert "dnn_version_info" not in GPU_TARGETS["h100"].target_config(installed_cudnn())
    wheel = tmp_path / "nvidia_cudnn_cu12-9.10.2.21.dist-info"
    wheel.mkdir()
    (wheel / "METADATA").write_text("Metadata-Version: 2.1\nName: nvidia-cudnn-cu12\n"
                                    "Version: 9.10.2.21\n")
    assert installed_cudnn() == (9, 10)
    config = GPU_TARGETS["h100"].target_config(installed_cudnn())
    assert "dnn_version_info { major: 9 minor: 10 }" in config


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--topology", "v99-1"], "--topology"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
        (["--remat", "everything"], "--remat"),
    ],
)
def test_bad_input_is_one_line(tiny_tokenizer_dir, argv, named):
    status, stdout, stderr = run_plan([*step_flags(tiny_tokenizer_dir), *argv])
    assert status == 2 and stdout == ""
    lines = [line for line in stderr.splitlines() if not line.startswith("compiling")]
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0]
    assert argv[1] in lines[0]


def test_the_model_type_is_needed_to_know_the_training_script(tiny_tokenizer_dir):
    status, _, stderr = run_plan(["--tokenizer_name", str(tiny_tokenizer_dir)])
    assert status == 2 and "--model_type" in stderr and len(stderr.splitlines()) == 1


@pytest.mark.parametrize(("name", "expected"), [
    ("h100", ("h100", 1)), ("H200:8", ("h200", 8)), ("a100:2", ("a100", 2)), ("v3-8", None),
])  # fmt: skip
def test_gpu_topologies_are_named_by_model_and_count(name, expected):
    assert gpu_target(name) == (expected and (GPU_TARGETS[expected[0]], expected[1]))


@pytest.mark.parametrize("topology", ["h100:0", "h100:two"] + (
    [] if HAS_CUDA_PLUGIN else ["h100"]))  # without JAX's CUDA plugin: what to install
def test_bad_gpu_topologies_are_one_line(tiny_tokenizer_dir, topology):
    status, stdout, stderr = run_plan([*step_flags(tiny_tokenizer_dir), "--topology", topology])
    assert status == 2 and stdout == ""
    lines = [line for line in stderr.splitlines() if not line.startswith("compiling")]
    assert len(lines) == 1 and lines[0].startswith("error:") and topology in lines[0]
    if topology == "h100":
        assert "jax[cuda12]" in lines[0]


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="JAX's CUDA plugin is not installed: "
                    "pip install -e '.[cuda]' (no GPU needed)")
def test_a_train_step_compiles_for_two_h100s_on_this_cpu(tiny_tokenizer_dir, monkeypatch):
    """XLA's GPU compiler, told an H100's data sheet, compiles the bfloat16 step for two of them
    with no GPU here: cuDNN's fused attention (the GPU's choice) and a gradient all-reduce."""
    compiled_steps = keep_compiled_steps(monkeypatch, step)
    flags = step_flags(tiny_tokenizer_dir)  # without dropout: attention dropout is not fused
    flags[flags.index(TINY_GPT2)] = TINY_GPT2 + ",attn_pdrop=0,resid_pdrop=0,embd_pdrop=0"
    status, stdout, _ = run_plan([*flags, "--topology", "h100:2", "--json"])
    assert status == 0
    result = json.loads(stdout)
    assert (result["devices"], result["device_kind"]) == (2, GPU_TARGETS["h100"].name)
    assert result["hbm_bytes"] == int(GPU_TARGETS["h100"].memory_bytes * 0.75)
    assert result["fits"] is True and result["settings"]["mesh"] == {"data": 2, "fsdp": 1}
    hlo = compiled_steps[0].as_text()
    assert "__cudnn$fmha" in hlo and all_reduced_elements(hlo)


@pytest.mark.parametrize(("needs_gib", "chosen"), [
    ({None: 12.0, "dots": 9.0, "full": 5.0}, None),  # fits as it is, with 10% spare
    ({None: 14.5, "dots": 9.0, "full": 5.0}, "dots"),  # fits, but with less than 10% spare
    ({None: 51.6, "dots": 20.0, "full": 9.0}, "full"),
    ({None: 51.6, "dots": 40.0, "full": 30.0}, "full"),  # nothing fits: the run's compile says
])  # fmt: skip
def test_remat_auto_takes_the_first_policy_that_leaves_memory_spare(
    tiny_tokenizer_dir, monkeypatch, needs_gib, chosen
):
    """--remat auto on a TPU or GPU: none, dots, full in turn, compiled until one leaves 10% of
    the device's memory; on a CPU none, without compiling."""
    from types import SimpleNamespace

    from flax_lm import plan as plan_module
    from flax_lm.train.args import parse_config

    compiled = []

    def measured(cfg, objective, target, with_flops=True):
        compiled.append(cfg.remat)
        total = int(needs_gib[cfg.remat] * 2**30)
        return plan_module.Plan({}, {"total": total}, total <= target.memory_bytes, True, 1.0)

    monkeypatch.setattr(plan_module, "plan_step", measured)
    cfg = parse_config(["--output_dir", "o", "--train_file", "a.txt"], "clm")
    assert cfg.remat == "auto"
    tpu = plan_module.Target("v3-8", [SimpleNamespace(platform="tpu")], int(15.48 * 2**30), "HBM")
    resolved, line = plan_module.choose_remat(cfg, "clm", tpu)
    assert resolved.remat == chosen
    order = [None, "dots", "full"]
    assert compiled == order[: order.index(chosen) + 1]
    assert line.startswith(f"remat auto: {chosen or 'none'} (") and "15.48 GiB" in line

    compiled.clear()
    cpu = plan_module.Target("local", [SimpleNamespace(platform="cpu")], 2**40, "host memory")
    assert plan_module.choose_remat(cfg, "clm", cpu) == (dataclasses.replace(cfg, remat=None), "")
    assert compiled == []
