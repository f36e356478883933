"""Flags copied from Hugging Face's Trainer, through a real tiny training run: --save_strategy,
--logging_first_step, --warmup_ratio, --max_train_samples counting blocks, --report_to wandb."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from test_resume import TINY_MODELS, run_in_process

from flax_lm.train.metrics import RunLog

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
                        "--logging_first_step", "--warmup_ratio", "0.5", "--do_eval",
                        "--eval_strategy", "epoch", "--eval_steps", "3")
    run_in_process(argv, "clm")
    results = json.loads((out / "train_results.json").read_text())
    assert (results["train_samples"], results["train_steps"]) == (16, 8)  # blocks, not files
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4", "8"]
    lines = train_lines(out)
    assert [line["step"] for line in lines] == [1, 8]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in evals if "eval_loss" in line] == [4, 8]  # not 3 and 6
    # warmup: ceil(0.5 * 8) = 4 steps; step s is trained at lr(s - 1)
    assert lines[0]["learning_rate"] == 0.0
    assert lines[1]["learning_rate"] == pytest.approx(PEAK * (8 - 7) / (8 - 4), rel=1e-6)


def test_save_strategy_no_saves_no_checkpoint_but_the_model(code_corpus, tiny_tokenizer_dir,
                                                            tmp_path):
    out = tmp_path / "no-checkpoints"
    run_in_process(trainer_argv(code_corpus, tiny_tokenizer_dir, out, "--save_strategy", "no",
                                "--max_steps", "2", "--do_eval", "--eval_strategy", "no",
                                "--eval_steps", "1"), "clm")
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in evals if "eval_loss" in line] == [2]  # after training
    assert not any((out / "checkpoints").glob("*"))
    assert (out / "model.safetensors").is_file() and (out / "train_results.json").is_file()


def test_evaluation_strategy_no_and_logging_dir(code_corpus, tiny_tokenizer_dir, tmp_path):
    """Hugging Face's names: --evaluation_strategy no without --do_train or --do_eval trains
    without evaluating; --logging_dir is where TensorBoard writes, instead of output_dir/runs."""
    out, board = tmp_path / "hf-flags", tmp_path / "board"
    argv = trainer_argv(code_corpus, tiny_tokenizer_dir, out, "--max_steps", "2",
                        "--evaluation_strategy", "no", "--logging_dir", str(board),
                        "--report_to", "tensorboard")  # fmt: skip
    argv.remove("--do_train")
    run_in_process(argv, "clm")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2]
    assert not any("eval_loss" in r for r in records)
    assert not (out / "eval_results.json").exists() and (out / "train_results.json").is_file()
    assert [p.name.startswith("events.out.tfevents") for p in board.iterdir()] == [True]
    assert not (out / "runs").exists()


class OutOfMemory(RuntimeError):
    """An XLA refusal as JAX raises it: the status code, then the allocator's report."""

    error_code_string = "RESOURCE_EXHAUSTED"


XLA_OUT_OF_MEMORY = (
    "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
    "hbm. Used 51.62G of 15.48G hbm.\n  Largest program allocations in hbm:\n  1. Size: 6.14G"
)


def test_a_step_that_does_not_fit_ends_the_run_with_what_would(code_corpus, tiny_tokenizer_dir,
                                                              tmp_path, monkeypatch, capsys):
    """XLA refusing the train step at its first compile: the run ends with exit 2 and one
    error line naming a setting that fits (compiled to check), not the allocator's report."""
    from flax_lm.commands.train import main
    from flax_lm.train import trainer

    compiles = []

    def out_of_memory(*args):
        compiles.append(args)
        raise OutOfMemory(XLA_OUT_OF_MEMORY)

    monkeypatch.setattr(trainer, "compile_train_step", out_of_memory)
    out = tmp_path / "too-big"
    argv = trainer_argv(code_corpus, tiny_tokenizer_dir, out, "--max_steps", "2")
    assert main(argv, objective="clm") == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--remat full fits" in last, err[-3000:]
    assert "Traceback" not in err and "Largest program allocations" not in err
    assert len(compiles) == 1 and not any((out / "checkpoints").glob("*"))  # no step saved


# ------------------------------------------------------------------------------------- wandb

WANDB_BLOCK, WANDB_RECORD_HEADER = 32768, 7  # the .wandb file: LevelDB log blocks of records
WANDB_WRITE_SECONDS = 60  # how long wandb's service may take to finish writing a run


def wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file, read as wandb's own (former)
    datastore reader did: a ':W&B' header, then records split across 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = WANDB_RECORD_HEADER, b""
    while position + WANDB_RECORD_HEADER <= len(data):
        left_in_block = WANDB_BLOCK - position % WANDB_BLOCK
        _, length, kind = struct.unpack("<IHB", data[position : position + WANDB_RECORD_HEADER])
        if left_in_block < WANDB_RECORD_HEADER or (kind, length) == (0, 0):
            position += left_in_block  # block padding
            continue
        start = position + WANDB_RECORD_HEADER
        pending += data[start : start + length]
        position = start + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run_finished(path: Path) -> bool:
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path))
    except Exception:  # noqa: BLE001 - a record still being written does not parse yet
        return False


def wandb_history(path: Path) -> tuple[dict, dict[int, dict]]:
    """(the run record, {step: the metrics logged at that step}), once wandb's service has
    written the run's exit record (it writes the file in the background)."""
    deadline = time.monotonic() + WANDB_WRITE_SECONDS
    while not wandb_run_finished(path):
        assert time.monotonic() < deadline, f"{path} holds no exit record"
        time.sleep(0.2)
    run, history = None, {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
        elif record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
    return run, history


def test_wandb_offline_run_holds_the_logged_metrics(code_corpus, tiny_tokenizer_dir, tmp_path,
                                                     monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "flax-lm-tests")
    out = tmp_path / "wandb-run"
    argv = trainer_argv(code_corpus, tiny_tokenizer_dir, out, "--max_steps", "4",
                        "--logging_steps", "2", "--do_eval", "--eval_steps", "4",
                        "--report_to", "wandb", "tensorboard", "--run_name", "tiny-wandb")
    run_in_process(argv, "clm")
    (log_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    run, history = wandb_history(log_file)
    assert (run.display_name, run.project) == ("tiny-wandb", "flax-lm-tests")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["learning_rate"] == PEAK and config["max_steps"] == 4
    assert config["hub_token"] is None and config["token"] is None
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "attention" in lines[0].pop("header")  # the run's header: not sent to W&B
    lines = lines[1:]
    assert sorted(history) == [2, 4] and len(lines) == 3  # train at 2 and 4, eval at 4
    for line in lines:
        group = "eval" if "eval_loss" in line else "train"
        for key, value in line.items():
            if key not in ("step", "time"):
                name = f"{group}/{key.removeprefix('eval_')}"
                assert history[line["step"]][name] == pytest.approx(value, rel=1e-12), name
    assert (out / "runs").is_dir()  # and TensorBoard too


def test_only_the_logging_process_reaches_wandb(tmp_path):
    class RecordingRun:
        logged: list = []

        def log(self, scalars, step):
            self.logged.append((step, scalars))

        def finish(self):
            self.logged.append("finish")

    for enabled in (False, True):
        log = RunLog(tmp_path, total_steps=1, initial_step=0, tensorboard=False,
                     wandb_run=RecordingRun(), enabled=enabled)
        log.train({"step": 1, "epoch": 0.5, "loss": 2.5, "accuracy": 0.25, "perplexity": 12.2,
                   "learning_rate": 0.1, "grad_norm": 1.0, "tokens_per_second": 10.0})
        log.close()
    assert RecordingRun.logged == [  # process 0 alone (enabled) logged
        (1, {"train/epoch": 0.5, "train/loss": 2.5, "train/accuracy": 0.25,
             "train/perplexity": 12.2, "train/learning_rate": 0.1, "train/grad_norm": 1.0,
             "train/tokens_per_second": 10.0}),
        "finish",
    ]
