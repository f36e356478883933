"""`flax-lm evaluate` reproduces the figures of the training run it evaluates."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import assert_one_line_error

from flax_lm.commands.evaluate import main

pytest_plugins = ["fixtures_models"]

SAME_COMPUTATION = 1e-6  # the same compiled eval step on the same batches: equal up to rounding


def run_evaluate(capsys, run, *extra: str, model: str | None = None) -> dict:
    argv = [
        "--model",
        model or str(run.output_dir),
        "--validation_file",
        str(run.validation),
        *run.flags,
        "--per_device_eval_batch_size",
        "16",
        "--seed",
        "7",
        *extra,
    ]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def eval_records(run) -> dict[int, dict]:
    lines = (run.output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r for r in records if "eval_loss" in r}


def test_gpt2_matches_the_run_eval_results(tiny_gpt2_run, capsys):
    expected = json.loads((tiny_gpt2_run.output_dir / "eval_results.json").read_text())
    got = run_evaluate(capsys, tiny_gpt2_run)
    assert got["objective"] == "clm" and got["seq_len"] == tiny_gpt2_run.seq_len
    assert got["eval_samples"] == expected["eval_samples"]
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], abs=SAME_COMPUTATION)
    assert got["eval_accuracy"] == pytest.approx(expected["eval_accuracy"], abs=SAME_COMPUTATION)
    assert got["perplexity"] == pytest.approx(math.exp(got["eval_loss"]), rel=1e-12)
    # Blocks of 64 tokens: 63 next-token targets each.
    assert got["eval_targets"] == got["eval_samples"] * (tiny_gpt2_run.seq_len - 1)


def test_checkpoint_matches_the_eval_logged_at_its_step(tiny_gpt2_run, capsys):
    logged = eval_records(tiny_gpt2_run)[15]
    checkpoint = tiny_gpt2_run.output_dir / "checkpoints" / "15"
    got = run_evaluate(capsys, tiny_gpt2_run, model=str(checkpoint))
    assert got["model"] == str(checkpoint)
    assert got["eval_loss"] == pytest.approx(logged["eval_loss"], abs=SAME_COMPUTATION)
    final = json.loads((tiny_gpt2_run.output_dir / "eval_results.json").read_text())
    assert got["eval_loss"] > final["eval_loss"]  # step 15 is before training finished


def test_checkpoint_of_a_run_without_exported_model(tiny_gpt2_run, tmp_path, capsys):
    """A run stopped early has checkpoints but no config.json: the config is given instead."""
    run_dir = tmp_path / "stopped"
    shutil.copytree(tiny_gpt2_run.output_dir / "checkpoints", run_dir / "checkpoints")
    assert main(["--model", str(run_dir), "--validation_file", str(tiny_gpt2_run.validation)]) == 2
    assert "pass --config_name" in capsys.readouterr().err
    got = run_evaluate(
        capsys,
        tiny_gpt2_run,
        "--config_name",
        str(tiny_gpt2_run.output_dir),
        "--tokenizer_name",
        str(tiny_gpt2_run.output_dir),
        model=str(run_dir),
    )
    assert got["model"] == str(run_dir / "checkpoints" / "30")  # the latest
    expected = json.loads((tiny_gpt2_run.output_dir / "eval_results.json").read_text())
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], abs=SAME_COMPUTATION)


def test_roberta_masks_follow_the_seed_like_the_trainer(tiny_roberta_run, capsys):
    expected = json.loads((tiny_roberta_run.output_dir / "eval_results.json").read_text())
    got = run_evaluate(capsys, tiny_roberta_run)
    assert got["objective"] == "mlm"
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], abs=SAME_COMPUTATION)
    assert got["eval_accuracy"] == pytest.approx(expected["eval_accuracy"], abs=SAME_COMPUTATION)
    # ~15% of the non-special tokens are targets.
    tokens = got["eval_samples"] * tiny_roberta_run.seq_len
    assert 0.10 < got["eval_targets"] / tokens < 0.20
    other_seed = run_evaluate(capsys, tiny_roberta_run, "--seed", "8")
    assert other_seed["eval_targets"] != got["eval_targets"]


@pytest.mark.parametrize(
    "args, names",
    [
        (["--model", "{tmp}/missing"], ("{tmp}/missing", "not a directory")),
        (["--model", "{tmp}"], ("{tmp}", "model.safetensors")),
        (["--model", "{run}", "--max_seq_length", "32"], ("--max_seq_length", "gpt2")),
        (["--model", "{run}", "--block_size", "4096"], ("--block_size 4096", "n_positions")),
        (["--model", "{run}", "--per_device_eval_batch_size", "0"],
         ("--per_device_eval_batch_size", "positive", "0")),
        (["--model", "{run}", "--block_sise", "8"], ("'--block_sise'", "--block_size")),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_error(tiny_gpt2_run, tmp_path, capsys, args, names):
    paths = {"tmp": tmp_path, "run": tiny_gpt2_run.output_dir}
    argv = [a.format(**paths) for a in args]
    status = main([*argv, "--validation_file", str(tiny_gpt2_run.validation)])
    captured = capsys.readouterr()
    assert_one_line_error((status, captured.err), *(name.format(**paths) for name in names))
    assert captured.out == ""


def test_missing_validation_file(tiny_gpt2_run, tmp_path, capsys):
    argv = [
        "--model",
        str(tiny_gpt2_run.output_dir),
        "--validation_file",
        str(tmp_path / "nope.py"),
    ]
    assert_one_line_error((main(argv), capsys.readouterr().err), str(tmp_path / "nope.py"))
