"""Flags copied from Hugging Face's Trainer, through a real tiny training run: --save_strategy,
--logging_first_step, --warmup_ratio and --max_train_samples counting blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_resume import TINY_MODELS, run_in_process

PEAK = 1e-3


def trainer_argv(code_corpus, tokenizer_dir: Path, out: Path, *extra: str) -> list[str]:
    """16 training blocks in batches of 4: 4 steps an epoch, 2 epochs."""
    return [
        "--output_dir", str(out), *TINY_MODELS["clm"], "--tokenizer_name", str(tokenizer_dir),
        "--train_file", str(code_corpus.train), "--validation_file", str(code_corpus.validation),
        "--max_train_samples", "16", "--max_eval_samples", "8", "--do_train",
        "--per_device_train_batch_size", "4", "--num_train_epochs", "2",
        "--learning_rate", str(PEAK), "--logging_steps", "100", "--seed", "3",
        "--report_to", "none", *extra,
    ]  # fmt: skip


def train_lines(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]


def test_epoch_checkpoints_first_step_logged_and_warmup_ratio(code_corpus, tiny_tokenizer_dir,
                                                              tmp_path):
    out = tmp_path / "epochs"
    argv = trainer_argv(code_corpus, tiny_tokenizer_dir, out, "--save_strategy", "epoch",
                        "--logging_first_step", "--warmup_ratio", "0.5")
    run_in_process(argv, "clm")
    results = json.loads((out / "train_results.json").read_text())
    assert (results["train_samples"], results["train_steps"]) == (16, 8)  # blocks, not files
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4", "8"]
    lines = train_lines(out)
    assert [line["step"] for line in lines] == [1, 8]
    # warmup: ceil(0.5 * 8) = 4 steps; step s is trained at lr(s - 1)
    assert lines[0]["learning_rate"] == 0.0
    assert lines[1]["learning_rate"] == pytest.approx(PEAK * (8 - 7) / (8 - 4), rel=1e-6)


def test_save_strategy_no_saves_no_checkpoint_but_the_model(code_corpus, tiny_tokenizer_dir,
                                                            tmp_path):
    out = tmp_path / "no-checkpoints"
    run_in_process(trainer_argv(code_corpus, tiny_tokenizer_dir, out, "--save_strategy", "no",
                                "--max_steps", "2"), "clm")
    assert not any((out / "checkpoints").glob("*"))
    assert (out / "model.safetensors").is_file() and (out / "train_results.json").is_file()
