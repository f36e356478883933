"""FLOPs per token and MFU (flax_lm.perf), and a smoke run of the benchmark (bench/bench.py)."""

from __future__ import annotations

import importlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import Background
from flax import nnx
from transformers import GPT2Config, RobertaConfig

from flax_lm import perf
from flax_lm.models import create_model, matmul_param_count

REPO = Path(__file__).resolve().parent.parent
SEQ = 32
sys.path.insert(0, str(REPO / "bench"))  # bench/accel.py imports its siblings by name
accel = importlib.import_module("accel")


BENCH_SCRIPTS = {  # test -> the script's arguments ({out}: a folder of its own)
    "test_bench_smoke": [
        "bench/bench.py", "--configs", "micro-clm", "--repeats", "1", "--steps", "3",
        "--peak_sizes", "64", "--out", "{out}/micro.json", "--workdir", "{out}/work"],
    "test_profile_step_splits_a_traced_step_into_matmuls_and_the_rest": [
        "bench/profile_step.py", "--config", "micro-clm", "--top", "40",
        "--trace_dir", "{out}/trace"],
    "test_the_gpu_check_is_one_call_that_runs_dry_on_the_cpu": [
        "-c", "import os, subprocess, sys; os.environ.update(OUT='{out}', WHEELS_DIR='{out}/none');"
        " sys.exit(subprocess.call(['bash', 'bench/gpu_check.sh', '--dry']))"],
}  # fmt: skip
# tests that read another test's script: the GPU check's dry run includes the harness's run
SCRIPT_OF = {"test_accelerator_bench_harness_on_the_cpu":
             "test_the_gpu_check_is_one_call_that_runs_dry_on_the_cpu"}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def bench_scripts(request, tmp_path_factory) -> dict[str, tuple[Background, Path]]:
    """The benchmark scripts of this module's selected tests, started together with its first
    test, so they also overlap the in-process tests (see Background). Test name -> (script, its
    folder)."""
    selected = {getattr(item, "originalname", None) for item in request.session.items}
    selected |= {SCRIPT_OF.get(test) for test in selected}
    started = {}
    for test, args in BENCH_SCRIPTS.items():
        if test in selected:
            out = tmp_path_factory.mktemp(test[:40])
            command = [sys.executable, *(a.format(out=out) for a in args)]
            started[test] = (Background(command, out / "logs", cwd=REPO), out)
    yield started
    for script, _ in started.values():
        script.kill()


def tiny_gpt2(**changes) -> GPT2Config:
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=64,
                      bos_token_id=0, eos_token_id=0, **changes)


def tiny_roberta() -> RobertaConfig:
    return RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=96, vocab_size=500, max_position_embeddings=66)


def torch_matmul_weights(config) -> int:
    """Weights of the PyTorch model's Linear/Conv1D modules, the tied LM head once: an
    independent count of the parameters that multiply every token."""
    torch = pytest.importorskip("torch")
    from transformers import GPT2LMHeadModel, RobertaForMaskedLM
    from transformers.pytorch_utils import Conv1D

    model_class = GPT2LMHeadModel if config.model_type == "gpt2" else RobertaForMaskedLM
    model = model_class(config)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    return sum(m.weight.numel() for m in layers)


def test_matmul_params_hand_count():
    d, layers, vocab = 64, 2, 500
    gpt2 = layers * (3 * d * d + d * d + d * 4 * d + 4 * d * d) + vocab * d  # qkv, proj, MLP, head
    roberta = layers * (4 * d * d + 2 * d * 96) + d * d + vocab * d  # + MLM-head dense
    assert matmul_param_count(tiny_gpt2()) == gpt2 == 130_304
    assert matmul_param_count(tiny_gpt2(n_inner=100)) == gpt2 - layers * 2 * d * (4 * d - 100)
    assert matmul_param_count(tiny_roberta()) == roberta == 93_440


@pytest.mark.parametrize("config", [tiny_gpt2(), tiny_roberta()], ids=["gpt2", "roberta"])
def test_matmul_params_equal_pytorch_linear_weights(config):
    assert matmul_param_count(config) == torch_matmul_weights(config)


def test_flops_per_token_formula():
    gpt2, roberta = tiny_gpt2(), tiny_roberta()
    # causal attention at half: 6 * n_layer * seq * d; bidirectional: 12 * n_layer * seq * d
    assert perf.model_flops_per_token(gpt2, SEQ) == 6 * 130_304 + 6 * 2 * SEQ * 64
    assert perf.model_flops_per_token(roberta, SEQ) == 6 * 93_440 + 12 * 2 * SEQ * 64
    # GPT-2 small at block 1024: 123.5M matmul weights, ~0.8 GFLOP per token
    small = GPT2Config()
    assert matmul_param_count(small) == 12 * 12 * 768**2 + 50257 * 768 == 123_532_032
    assert perf.model_flops_per_token(small, 1024) == 741_192_192 + 56_623_104


@pytest.mark.parametrize("config", [tiny_gpt2(), tiny_roberta()], ids=["gpt2", "roberta"])
def test_formula_matches_flops_xla_counts(config):
    """XLA's own FLOP count of a forward+backward pass agrees with the formula within 10%
    (the rest is elementwise work). XLA computes the whole causal score matrix, so the
    comparison counts attention in full."""
    model = create_model(config, scan_layers=False)  # scanned bodies are counted once
    graphdef, params = nnx.split(model)
    ids = jnp.ones((2, SEQ), jnp.int32)

    def loss(p):
        return nnx.merge(graphdef, p)(ids).mean()

    counted = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()["flops"]
    tokens = ids.size
    attention = perf.attention_flops_per_token(
        config.num_hidden_layers, SEQ, config.hidden_size, causal=False
    )
    formula = (perf.matmul_flops_per_token(matmul_param_count(config)) + attention) * tokens
    assert counted == pytest.approx(formula, rel=0.10)


def test_mfu():
    assert perf.achieved_flops_per_second(1000.0, 2e6) == 2e9
    assert perf.mfu(1000.0, 2e6, 4e9) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        perf.mfu(1000.0, 2e6, 0.0)


@pytest.mark.slow
def test_bench_smoke(bench_scripts):
    """The whole benchmark on a micro model: both sides train on the same batches, the
    figures are consistent with each other and the table names the config."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    script, folder = bench_scripts["test_bench_smoke"]
    out = folder / "micro.json"
    done = script.result()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    run = results["configs"]["micro-clm"]
    ours, peer = run["ours"], run["peer"]
    assert run["settings"]["vocab_size"] == 8192
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=8192)
    assert run["flops_per_token"] == perf.model_flops_per_token(config, 32)
    assert run["ratio"] == pytest.approx(ours["tokens_per_second"] / peer["tokens_per_second"])
    for side in (ours, peer):
        assert side["tokens_per_second"] > 0 and side["peak_rss_mb"] > 100
        assert side["mfu"]["float32"] == pytest.approx(
            side["tokens_per_second"] * run["flops_per_token"] / results["peak"]["jax"]["float32"]
        )
        # 3 steps from a random init on the same batches: both near ln(vocab), close together
        assert abs(side["train_loss"] - math.log(8192)) < 0.5
    assert abs(ours["train_loss"] - peer["train_loss"]) < 0.1
    assert abs(ours["eval_loss"] - peer["eval_loss"]) < 0.1
    assert 0.0 <= ours["input_stall"] < 1.0 and ours["compile_seconds"] > 0
    assert "| micro-clm | 32×4 |" in results["markdown"]
    assert "| micro-clm | 32×4 |" in done.stdout


@pytest.mark.slow
def test_profile_step_splits_a_traced_step_into_matmuls_and_the_rest(bench_scripts):
    """bench/profile_step.py traces one real train step of the micro model and attributes time
    to its XLA operations: the model's matmuls are found and the trace is kept."""
    script, tmp_path = bench_scripts["test_profile_step_splits_a_traced_step_into_matmuls_and_the_rest"]
    done = script.result()
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("micro-clm: step ") and "tokens/s" in lines[0]
    matmul_seconds = float(lines[1].split("matmuls ")[1].split(" s")[0])
    other_seconds = float(lines[1].split("everything else ")[1].split(" s")[0])
    assert matmul_seconds > 0 and other_seconds > 0
    rows = [line.split() for line in lines[3:] if line[:8].strip().replace(".", "").isdigit()]
    assert sum(row[1] == "matmul" for row in rows) >= 3  # qkv, projections, head: fwd and bwd
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="there is a GPU: it would run")
def test_bench_on_a_missing_accelerator_says_so():
    done = subprocess.run([sys.executable, "bench/bench.py", "--device", "gpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--device gpu" in done.stderr and "cpu" in done.stderr


def test_the_loss_check_fails_beyond_its_tolerance():
    """A flax-lm curve that falls faster than PyTorch's (a mask leaking future tokens) fails;
    bfloat16 rounding within the tolerance passes."""
    peer = {"losses": [9.0, 8.0, 7.0]}
    close = {"losses": [9.0 * 1.001, 8.0, 7.0 * (1 + accel.LOSS_TOLERANCE["last"] / 2)]}
    leaking = {"losses": [9.0, 7.0, 5.0]}
    assert accel.loss_check(close, peer)["ok"]
    found = accel.loss_check(leaking, peer)
    assert not found["ok"] and found["last"]["relative_difference"] == pytest.approx(2 / 7)
    assert not accel.loss_check({"losses": [float("nan"), 8.0, 7.0]}, peer)["ok"]


@pytest.mark.slow
def test_accelerator_bench_harness_on_the_cpu(bench_scripts):
    """bench.py --device gpu's harness (bench/accel.py) with micro models on the CPU, as the GPU
    check's dry run (below) runs it: flax-lm's train step and PyTorch's bf16 autocast step, each
    in its own process, start from the loss of a random model, and the MFU columns are tokens/s
    x FLOPs over the peaks."""
    script, folder = bench_scripts["test_the_gpu_check_is_one_call_that_runs_dry_on_the_cpu"]
    done = script.result(timeout=1200)  # per config: flax-lm, then PyTorch from its weights
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    stdout = (folder / "bench.txt").read_text()  # the bench stage's output
    results = json.loads((folder / "bench.json").read_text())
    assert [run["config"] for run in results["runs"]] == ["micro-clm", "micro-mlm"]
    for run in results["runs"]:
        ours, peer = run["sides"]["flax-lm"], run["sides"]["torch eager"]
        assert ours["attention"] == "reference" and ours["vocab_size"] == 8192
        assert ours["layers"] == "scanned"  # the CPU's choice (flax_lm/backend.py)
        for side in (ours, peer):
            assert side["tokens_per_second"] > 0 and side["compile_seconds"] > 0
            assert side["mfu_measured_peak"] == pytest.approx(
                side["tokens_per_second"] * run["flops_per_token"]
                / results["peak"]["jax"]["bfloat16"])
            assert abs(side["first_loss"] - math.log(8192)) < 0.5
            assert len(side["losses"]) == 2 + 3  # the timed steps and the warmup's
        # the loss check: PyTorch started from flax-lm's weights on its tokens and schedule
        check = run["loss_check"]["torch eager"]
        assert check["ok"] and check["steps"] == 5
        assert check["first"]["relative_difference"] < 1e-3  # the same model and tokens
        assert ours["losses"][-1] < ours["losses"][0]  # and it trained
        assert check["last"]["relative_difference"] <= accel.LOSS_TOLERANCE["last"]
        assert f"| {run['config']} | 4 | torch eager |" in stdout
        assert f"| {run['config']} | 4 | flax-lm (scanned) |" in stdout
        assert f"{run['config']} b4 vs torch eager" in stdout


def gpu_check_stages() -> dict[str, int]:
    """The stages bench/gpu_check.sh's header lists, with their expected device seconds."""
    header = (REPO / "bench" / "gpu_check.sh").read_text().split("\nset -u", 1)[0]
    return {name: int(seconds) for name, seconds in
            re.findall(r"^#\s+(\w+)\s+~(\d+) s ", header, re.M)}


@pytest.mark.slow
def test_the_gpu_check_is_one_call_that_runs_dry_on_the_cpu(bench_scripts):
    """`bash bench/gpu_check.sh --dry`: the default stages (versions, the attention kernel
    against the reference, flax-lm against torch with the loss check) with micro models on the
    CPU, results in $OUT. Its header's expected times keep the default call under 7 minutes."""
    stages = gpu_check_stages()
    default = ["versions", "attention", "bench"]
    assert list(stages)[:3] == default and {"eager", "layers", "profile"} <= set(stages)
    assert sum(stages[name] for name in default) < 7 * 60
    script, tmp_path = bench_scripts["test_the_gpu_check_is_one_call_that_runs_dry_on_the_cpu"]
    done = script.result(timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary) == sorted(default)
    assert all(stage["status"] == 0 for stage in summary.values())
    assert "jax" in (tmp_path / "versions.txt").read_text()
    assert " passed" in (tmp_path / "attention.txt").read_text()
    results = json.loads((tmp_path / "bench.json").read_text())
    assert [run["config"] for run in results["runs"]] == ["micro-clm", "micro-mlm"]
    for run in results["runs"]:
        assert run["loss_check"]["torch eager"]["ok"]
