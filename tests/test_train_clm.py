"""run_clm_flax.py end to end on stdlib source with a tiny GPT-2: outputs, PyTorch parity, and the
same training whatever the split into devices and microbatches."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import Background, host_devices

from flax_lm.commands.train import main

REPO = Path(__file__).resolve().parents[1]
TINY_GPT2 = (
    "n_embd=64,n_layer=2,n_head=4,n_positions=64,vocab_size=512,bos_token_id=0,eos_token_id=2,"
    "resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
)
STEPS = 10
LOSS_TOLERANCE = 1e-5  # float32: same losses whatever the split into devices / microbatches


def clm_argv(
    code_corpus, tokenizer_dir: Path, output_dir: Path, cache_dir: Path, *extra: str
) -> list[str]:
    """10 steps of a global batch of 8 blocks of 64 tokens; warmup longer than the run (lr
    rises all along; checks the warning too)."""
    return [
        "--output_dir", str(output_dir), "--model_type", "gpt2", "--config_name", "gpt2",
        "--config_overrides", TINY_GPT2, "--tokenizer_name", str(tokenizer_dir),
        "--train_file", str(code_corpus.train), "--validation_file", str(code_corpus.validation),
        "--block_size", "64", "--max_steps", str(STEPS), "--learning_rate", "1e-2",
        "--warmup_steps", "12", "--weight_decay", "0.01", "--logging_steps", "1",
        "--eval_steps", "5", "--save_steps", "5", "--per_device_eval_batch_size", "16",
        "--compilation_cache_dir", str(cache_dir), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


def run_in_process(argv: list[str], objective: str = "clm") -> str:
    """main(argv) in this process; returns its stderr (status must be 0)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv, objective=objective)
    assert status == 0, err.getvalue()[-2000:]
    return err.getvalue()


def read_metrics(output_dir: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


@pytest.fixture(scope="session")
def clm_run(code_corpus, tiny_tokenizer_dir, jax_cache, tmp_path_factory):
    """One device, per-device batch 8, no accumulation: (output_dir, argv, stderr)."""
    out = tmp_path_factory.mktemp("clm") / "run"
    argv = clm_argv(code_corpus, tiny_tokenizer_dir, out, jax_cache)
    return out, argv, run_in_process([*argv, "--per_device_train_batch_size", "8"])


def test_clm_trains_and_writes_every_output(clm_run):
    out, _, stderr = clm_run
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [5, 10]
    for record in train:
        assert set(record) == {"step", "epoch", "loss", "accuracy", "perplexity",
                               "learning_rate", "grad_norm", "tokens_per_second", "time"}  # fmt: skip
        assert record["tokens_per_second"] > 0 and record["grad_norm"] > 0
        assert record["perplexity"] == pytest.approx(np.exp(record["loss"]), rel=1e-9)
        assert 0 <= record["accuracy"] <= 1
    assert train[-1]["accuracy"] > train[0]["accuracy"]  # it learns the commonest tokens
    for record in evals:
        assert set(record) == {"step", "eval_loss", "eval_accuracy", "perplexity", "time"}
        assert record["perplexity"] == pytest.approx(np.exp(record["eval_loss"]), rel=1e-9)
    # loss falls: from about ln(512) = 6.2 at initialisation
    assert train[0]["loss"] == pytest.approx(np.log(512), abs=0.3)
    assert np.mean([r["loss"] for r in train[-3:]]) < train[0]["loss"] - 0.5
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    # learning rate: linear warmup over 12 steps, so step s (1-based) used 1e-2 * (s - 1) / 12
    for record in train:
        assert record["learning_rate"] == pytest.approx(1e-2 * (record["step"] - 1) / 12, rel=1e-5)
    assert "warning: --warmup_steps 12 is longer than training (10 steps)" in stderr

    results = {name: json.loads((out / f"{name}_results.json").read_text())
               for name in ("train", "eval", "all")}  # fmt: skip
    assert set(results["train"]) == {"train_loss", "train_runtime", "train_samples",
                                     "train_steps", "train_tokens_per_second", "compile_seconds"}  # fmt: skip
    assert set(results["eval"]) == {"eval_loss", "eval_accuracy", "perplexity", "eval_samples"}
    assert results["all"] == results["train"] | results["eval"]
    assert results["train"]["train_steps"] == STEPS
    assert (
        results["train"]["compile_seconds"] > 0 and results["train"]["train_tokens_per_second"] > 0
    )
    assert results["eval"]["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-12)
    train_loss = sum(r["loss"] for r in train) / STEPS  # every block has 63 targets
    assert results["train"]["train_loss"] == pytest.approx(train_loss, rel=1e-6)

    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["n_embd"] == 64
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["10", "5"]
    assert list((out / "runs").glob("events.out.tfevents.*")), "no TensorBoard events"


def clm_eval_blocks(argv: list[str], tokenizer) -> np.ndarray:
    """The validation blocks the run evaluated on, made again by the data pipeline."""
    from flax_lm.train.args import parse_config
    from flax_lm.train.data.splits import load_raw_splits
    from flax_lm.train.data.tokenize import tokenize_splits

    cfg = parse_config(argv, "clm")
    splits = tokenize_splits(load_raw_splits(cfg), tokenizer, cfg, "clm")
    return np.asarray(splits["validation"]["input_ids"])


def test_exported_model_gives_the_same_eval_loss_in_pytorch(clm_run):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, argv, _ = clm_run
    tokenizer = AutoTokenizer.from_pretrained(out)
    blocks = torch.tensor(clm_eval_blocks(argv, tokenizer), dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    loss_sum, targets = 0.0, 0
    with torch.no_grad():
        for chunk in blocks.split(64):
            logits = model(chunk).logits[:, :-1].double()
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
            )
            loss_sum += float(losses)
            targets += chunk[:, 1:].numel()
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_samples"] == len(blocks)
    assert loss_sum / targets == pytest.approx(eval_results["eval_loss"], abs=1e-4)


def test_evaluate_only_a_saved_model(clm_run, code_corpus, jax_cache, tmp_path):
    """--do_eval alone with --model_name_or_path: the exported weights give the run's eval loss;
    tokenizer and config come from the model directory, and no model is written."""
    out, _, _ = clm_run
    evaluated = tmp_path / "evaluated"
    run_in_process([
        "--output_dir", str(evaluated), "--model_name_or_path", str(out), "--do_eval",
        "--train_file", str(code_corpus.train), "--validation_file", str(code_corpus.validation),
        "--block_size", "64", "--per_device_eval_batch_size", "16",
        "--compilation_cache_dir", str(jax_cache),
    ])  # fmt: skip
    expected = json.loads((out / "eval_results.json").read_text())
    actual = json.loads((evaluated / "eval_results.json").read_text())
    assert actual["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-6)
    assert actual["eval_samples"] == expected["eval_samples"]
    assert not (evaluated / "model.safetensors").exists()
    assert not (evaluated / "train_results.json").exists()
    train, evals = read_metrics(evaluated)
    assert train == [] and [r["step"] for r in evals] == [0]


def test_gradient_accumulation_equals_the_full_batch(clm_run, tmp_path):
    out, argv, _ = clm_run
    accumulated = tmp_path / "accumulated"
    argv = [a if a != str(out) else str(accumulated) for a in argv]
    run_in_process(
        [*argv, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4"]
    )
    assert_same_losses(read_metrics(out), read_metrics(accumulated))


@pytest.fixture(scope="module", autouse=True)
def eight_devices(request, tmp_path_factory) -> tuple[Background, Path] | None:
    """./run_clm_flax.py as a real subprocess on 8 host devices of batch 1 each, started with this
    module's first test so that it runs while the in-process ones do (see conftest.Background):
    (the process, its output_dir), or None when its test is not selected."""
    test = "test_eight_devices_equal_one_device_in_a_subprocess"
    if test not in {getattr(item, "originalname", None) for item in request.session.items}:
        yield None
        return
    root = tmp_path_factory.mktemp("eight_devices")
    argv = clm_argv(request.getfixturevalue("code_corpus"),
                    request.getfixturevalue("tiny_tokenizer_dir"), root / "sharded",
                    request.getfixturevalue("jax_cache"))  # fmt: skip
    env = {**os.environ, **host_devices(8), "JAX_PLATFORMS": "cpu"}
    script_argv = [*argv, "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "2"]
    command = [sys.executable, str(REPO / "run_clm_flax.py"), *script_argv]
    process = Background(command, root / "logs", cwd=root, env=env)
    yield process, root / "sharded"
    process.kill()


@pytest.mark.slow
def test_eight_devices_equal_one_device_in_a_subprocess(clm_run, eight_devices):
    """./run_clm_flax.py as a real subprocess, on 8 host devices of batch 1 each."""
    out, _, _ = clm_run
    process, sharded = eight_devices
    done = process.result()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train: 10 steps" in done.stdout
    assert_same_losses(read_metrics(out), read_metrics(sharded))


def assert_same_losses(expected, actual) -> None:
    (train_a, evals_a), (train_b, evals_b) = expected, actual
    assert len(train_a) == len(train_b) == STEPS
    for a, b in zip(train_a, train_b, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=LOSS_TOLERANCE)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for a, b in zip(evals_a, evals_b, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=LOSS_TOLERANCE)
