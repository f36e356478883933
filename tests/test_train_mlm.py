"""run_mlm_flax.py end to end with a tiny RoBERTa (dropout on, layers unrolled): outputs, PyTorch
parity, and resuming from a checkpoint reproduces the uninterrupted run bit for bit."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import raises_user_error
from safetensors.numpy import load_file

from flax_lm.commands.train import main

TINY_ROBERTA = (
    "hidden_size=64,num_hidden_layers=2,num_attention_heads=4,intermediate_size=128,"
    "vocab_size=512,max_position_embeddings=66,pad_token_id=1,bos_token_id=0,eos_token_id=2"
)  # dropout stays at roberta-base's 0.1
STEPS, SAVE_STEPS = 8, 4


def mlm_argv(code_corpus, tokenizer_dir: Path, output_dir: Path, cache_dir: Path) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--model_type", "roberta", "--config_name", "roberta-base",
        "--config_overrides", TINY_ROBERTA, "--tokenizer_name", str(tokenizer_dir),
        "--train_file", str(code_corpus.train), "--validation_file", str(code_corpus.validation),
        "--max_seq_length", "64", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "32", "--max_steps", str(STEPS), "--learning_rate", "5e-3",
        "--warmup_steps", "2", "--weight_decay", "0.01", "--adam_beta2", "0.98",
        "--logging_steps", "1", "--eval_steps", str(SAVE_STEPS), "--save_steps", str(SAVE_STEPS),
        "--report_to", "none", "--no_scan_layers", "--compilation_cache_dir", str(cache_dir),
    ]  # fmt: skip


def run_in_process(argv: list[str]) -> str:
    """main(argv) for MLM in this process; returns stdout + stderr (status must be 0)."""
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
        status = main(argv, objective="mlm")
    assert status == 0, captured.getvalue()[-2000:]
    return captured.getvalue()


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def mlm_run(code_corpus, tiny_tokenizer_dir, tmp_path_factory):
    """(output_dir, argv) of an uninterrupted 8-step run, checkpointed at steps 4 and 8."""
    root = tmp_path_factory.mktemp("mlm")
    argv = mlm_argv(code_corpus, tiny_tokenizer_dir, root / "run", root / "jax_cache")
    run_in_process(argv)
    return root / "run", argv


def test_mlm_trains_and_writes_every_output(mlm_run):
    out, _ = mlm_run
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [4, 8]
    assert train[0]["loss"] == pytest.approx(np.log(512), abs=0.3)  # uniform at initialisation
    assert np.mean([r["loss"] for r in train[-2:]]) < train[0]["loss"] - 0.3
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert 0 < evals[1]["eval_accuracy"] < 1
    all_results = json.loads((out / "all_results.json").read_text())
    assert all_results["train_steps"] == STEPS and all_results["eval_samples"] > 0
    assert not (out / "runs").exists()  # --report_to none
    assert json.loads((out / "config.json").read_text())["architectures"] == ["RobertaForMaskedLM"]


def test_exported_model_gives_the_same_masked_eval_loss_in_pytorch(mlm_run):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from flax_lm.train.args import parse_config
    from flax_lm.train.data.feed import eval_host_batches
    from flax_lm.train.data.splits import load_raw_splits
    from flax_lm.train.data.tokenize import tokenize_splits
    from flax_lm.train.objectives import make_objective

    out, argv = mlm_run
    cfg = parse_config(argv, "mlm")
    tokenizer = AutoTokenizer.from_pretrained(out)
    validation = tokenize_splits(load_raw_splits(cfg), tokenizer, cfg, "mlm")["validation"]
    objective = make_objective("mlm", tokenizer, cfg)
    model = AutoModelForMaskedLM.from_pretrained(out, dtype=torch.float32).eval()
    loss_sum, targets = 0.0, 0
    with torch.no_grad():  # the same batches and masks as the run's evaluation
        for batch in eval_host_batches(validation, objective, 32, cfg.seed):
            ids, mask = (torch.from_numpy(batch[k]).long() for k in ("input_ids", "attention_mask"))
            labels = torch.from_numpy(batch["labels"]).long()
            logits = model(input_ids=ids, attention_mask=mask).logits.double()
            loss_sum += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
            ))  # fmt: skip
            targets += int((labels != -100).sum())
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert loss_sum / targets == pytest.approx(eval_results["eval_loss"], abs=1e-4)


def test_resume_reproduces_the_uninterrupted_run_exactly(mlm_run, tmp_path):
    """Only checkpoint 4 of the run, resumed with the bare flag: same data, masks, dropout and
    learning rate, so the final parameters are bit-identical on CPU."""
    out, argv = mlm_run
    resumed = tmp_path / "resumed"
    shutil.copytree(
        out / "checkpoints" / str(SAVE_STEPS), resumed / "checkpoints" / str(SAVE_STEPS)
    )
    argv = [a if a != str(out) else str(resumed) for a in argv]
    log = run_in_process([*argv, "--resume_from_checkpoint"])
    assert f"resumed from checkpoint {resumed / 'checkpoints' / '4'} at step 4" in log

    expected, actual = (
        load_file(str(out / "model.safetensors")),
        load_file(str(resumed / "model.safetensors")),
    )
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    later = [r for r in read_metrics(out) if r["step"] > SAVE_STEPS]
    again = [r for r in read_metrics(resumed) if "header" not in r]
    assert [
        {k: v for k, v in r.items() if k not in ("time", "tokens_per_second")} for r in again
    ] == [{k: v for k, v in r.items() if k not in ("time", "tokens_per_second")} for r in later]
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["4", "8"]


def test_find_checkpoint_forms(mlm_run, tmp_path):
    from flax_lm.train.checkpoint import find_checkpoint, read_meta

    out, _ = mlm_run
    root = out / "checkpoints"
    assert find_checkpoint("latest", out) == (root, [8, 4], False)  # newest first
    assert find_checkpoint(str(root), out) == (root, [8, 4], False)
    assert find_checkpoint(str(out), Path("elsewhere")) == (root, [8, 4], False)
    assert find_checkpoint(str(root / "4"), out) == (root, [4], True)  # that step alone
    meta = read_meta(root, 4)
    assert meta["step"] == 4 and meta["objective"] == "mlm" and meta["global_batch_size"] == 8
    assert meta["data"] == {"epoch": 0, "batch_in_epoch": 4}
    with raises_user_error("checkpoint", "resume"):
        find_checkpoint("latest", tmp_path)  # a run's checkpoints dir with nothing saved yet
