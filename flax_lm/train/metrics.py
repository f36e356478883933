"""Where a run's numbers go: `metrics.jsonl`, TensorBoard events, Weights & Biases, the
progress bar and the log's lines. TensorBoard and W&B get the same names ("train/loss",
"train/accuracy", "eval/loss", ...) at the training step; W&B (`--report_to wandb`) writes its
run under output_dir/wandb/ and follows its own environment variables (WANDB_MODE=offline: no
network, `wandb sync` uploads it later).

metrics.jsonl holds one JSON object per line:
  train: {"step", "epoch", "loss", "accuracy", "perplexity", "learning_rate", "grad_norm",
         "tokens_per_second", "mfu" (where the device's peak is known), "time"}
         (loss: token-weighted mean since the previous train line, accuracy the share of those
         targets predicted right, perplexity exp(loss); grad_norm: mean over those steps, before
         clipping; learning_rate: that of the last step; time: seconds since start)
  eval:  {"step", "eval_loss", "eval_accuracy", "perplexity", "time"}
  header: {"step", "header": {"attention", "attention_reason"}} (how the run computes, from
         `step` on: written when a run starts, unless the file's last header says the same)
Non-finite numbers are written as null, so every line is strict JSON.

Every train and eval record and every checkpoint saved is also a line on stdout; the progress
bar (stderr) is drawn only on a terminal (console.py), above which those lines then print.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flax_lm.console import duration, stderr_is_terminal
from flax_lm.errors import UserError, one_line
from flax_lm.storage import copy_into, is_cloud
from flax_lm.train.args import mask_secrets

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "runs"
WANDB_DEFAULT_PROJECT = "flax-lm"  # WANDB_PROJECT overrides it
MAX_LOG_PERPLEXITY = math.log(sys.float_info.max)


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows (never an exception)."""
    return math.exp(loss) if loss <= MAX_LOG_PERPLEXITY else math.inf


def strict_json(record: dict[str, Any]) -> str:
    """One line of JSON; NaN and infinities become null (JSON has no such numbers)."""
    clean = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }
    return json.dumps(clean, allow_nan=False)


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(json.loads(strict_json(record)), indent=2) + "\n", encoding="utf-8")


def keep_records_up_to(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines after `step`: a resumed run logs those steps again."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(kept), encoding="utf-8")


@contextlib.contextmanager
def secrets_masked_in_sys_argv() -> Iterator[None]:
    """sys.argv with every secret flag's value masked meanwhile: wandb.init records the
    command line (sys.argv) in the run's metadata, which `wandb sync` or an online run uploads."""
    original = sys.argv
    sys.argv = mask_secrets(original)
    try:
        yield
    finally:
        sys.argv = original


def start_wandb(output_dir: Path, run_name: str | None, config: dict[str, Any]):
    """A W&B run for this training run (process 0 only), its files under output_dir/wandb/."""
    import wandb

    try:
        with secrets_masked_in_sys_argv():
            return wandb.init(
                project=os.environ.get("WANDB_PROJECT", WANDB_DEFAULT_PROJECT),
                name=run_name or str(output_dir),
                dir=None if is_cloud(output_dir) else str(output_dir),  # gs://: W&B's ./wandb
                config=config,
            )
    except Exception as err:  # no login, no network, a bad setting: one line before training
        raise UserError(
            f"--report_to wandb: cannot start a Weights & Biases run ({one_line(err, None)}): "
            "run `wandb login`, or set WANDB_MODE=offline to log locally"
        ) from None


def scalar_names(group: str, record: dict[str, Any]) -> dict[str, float]:
    """{"train/loss": ..., "eval/accuracy": ...}: the record's numbers as TensorBoard and W&B
    name them."""
    return {
        f"{group}/{key.removeprefix('eval_')}": value
        for key, value in record.items()
        if key not in ("step", "time") and isinstance(value, int | float)
    }


class EventFile:
    """A TensorBoard event file in `logdir`, written and flushed in the calling thread. (A
    tensorboardX SummaryWriter writes from a thread of its own: a full disk ends that thread
    with a traceback and its next flush waits forever. Here it is an OSError, which the run
    reports as it reports any failed write.)"""

    def __init__(self, logdir: Path):
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.record_writer import RecordWriter

        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.records = RecordWriter(str(logdir / name))
        self.write([Event(wall_time=time.time(), file_version="brain.Event:2")])

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        self.write([Event(wall_time=now, step=step, summary=scalar(name, value))
                    for name, value in scalars.items()])  # fmt: skip

    def write(self, events: list) -> None:
        for event in events:
            self.records.write(event.SerializeToString())
        self.records.flush()

    def close(self) -> None:
        try:
            self.records.flush()
        finally:
            self.records.close()


def train_line(record: dict[str, Any], total_steps: int, eta_seconds: float | None) -> str:
    """A train record as the line a log shows: "step 20/100: epoch 0.41, loss 5.1234, ...";
    MFU where the record has it, the time left where it is known."""
    parts = [
        f"epoch {record['epoch']:.4g}",
        f"loss {record['loss']:.4f}",
        f"accuracy {record['accuracy']:.4f}",
        f"perplexity {record['perplexity']:.2f}",
        f"learning_rate {record['learning_rate']:.3e}",
        f"grad_norm {record['grad_norm']:.3f}",
        f"{record['tokens_per_second']:,.0f} tokens/s",
    ]
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if eta_seconds is not None:
        parts.append(f"ETA {duration(eta_seconds)}")
    return f"step {record['step']}/{total_steps}: " + ", ".join(parts)


def run_header(
    *, documents: dict[str, int | None], examples: int | None, seq_len: int, devices: str,
    mesh: dict[str, int], global_batch: str, steps: int, steps_per_epoch: int | None,
) -> str:
    """The lines a training run starts with, as Hugging Face's scripts start theirs: what it
    reads, on what, in how many steps. Unknown counts (a stream's) are said to be so."""
    def count(value: int | None) -> str:
        return "unknown (streamed)" if value is None else f"{value:,}"

    epochs = f"{steps / steps_per_epoch:.4g} epochs of {steps_per_epoch:,} steps" if (
        steps_per_epoch) else "a stream: no epochs known ahead"
    tokens = "" if examples is None else f" ({examples * seq_len:,} tokens)"
    return "\n".join([
        "***** Running training *****",
        "  documents: " + ", ".join(f"{count(n)} {name}" for name, n in documents.items()),
        f"  train examples: {count(examples)} of {seq_len} tokens{tokens}",
        f"  devices: {devices}, mesh {' x '.join(f'{k}={v}' for k, v in mesh.items())}",
        f"  global batch: {global_batch}",
        f"  steps: {steps:,} ({epochs})",
    ])


class RunLog:
    """Appends train and eval records to metrics.jsonl and TensorBoard, and drives the progress
    bar. `enabled=False` (processes other than the first) makes every call a no-op."""

    def __init__(
        self,
        output_dir: Path,
        *,
        total_steps: int,
        initial_step: int,
        tensorboard: bool,
        tensorboard_dir: str | None = None,
        wandb_run=None,
        enabled: bool = True,
    ):
        """`tensorboard_dir`: where the TensorBoard events go (--logging_dir; default
        output_dir/runs, through the staging folder of a gs:// output_dir)."""
        self.enabled, self.output_dir, self.staging = enabled, output_dir, None
        self.wandb = wandb_run if enabled else None
        self.start = time.perf_counter()
        self.total_steps = total_steps
        self.last_line: tuple[int, float] | None = None  # (step, time) of the last train line
        files = Path(output_dir)
        if enabled and is_cloud(output_dir):  # appended here, copied there by sync()
            files = self.staging = Path(tempfile.mkdtemp(prefix="flax-lm-log-"))
            if (output_dir / METRICS_FILE).exists():
                (files / METRICS_FILE).write_bytes((output_dir / METRICS_FILE).read_bytes())
        self.initial_step = initial_step
        self.jsonl = (files / METRICS_FILE).open("a", encoding="utf-8") if enabled else None
        self.board = None
        if enabled and tensorboard:
            self.board = EventFile(Path(tensorboard_dir) if tensorboard_dir else files / TENSORBOARD_SUBDIR)
        self.bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc="train",
            unit="step",
            disable=not enabled or not stderr_is_terminal(),
            dynamic_ncols=True,
        )

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def train(self, record: dict[str, Any]) -> None:
        self.write("train", record)
        self.message(train_line(record, self.total_steps, self.eta(record["step"])))
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            lr=f"{record['learning_rate']:.2e}",
            tok_s=f"{record['tokens_per_second']:,.0f}",
        )

    def eta(self, step: int) -> float | None:
        """Seconds to the last step at the pace since the previous train line (evaluations and
        checkpoints included: they take their share of what is left too)."""
        now, last = time.perf_counter(), self.last_line
        self.last_line = (step, now)
        if last is None or step <= last[0]:
            return None
        return (self.total_steps - step) * (now - last[1]) / (step - last[0])

    def checkpoint(self, step: int, seconds: float, where: Any) -> None:
        """The line of a checkpoint saved: its step, the seconds the loop waited, where."""
        self.message(f"step {step}: saved checkpoint {where} in {seconds:.2f} s")

    def header(self, fields: dict[str, Any]) -> None:
        """Say how the run computes, from its first step on: a header record in metrics.jsonl
        (not in TensorBoard or W&B), unless the last one already says the same."""
        if not self.enabled:
            return
        self.jsonl.flush()
        last = None
        with open(self.jsonl.name, encoding="utf-8") as lines:
            for line in lines:
                if line.strip() and '"header"' in line:
                    last = json.loads(line).get("header", last)
        if last != fields:
            self.jsonl.write(strict_json({"step": self.initial_step, "header": fields}) + "\n")
            self.jsonl.flush()

    def eval(self, record: dict[str, Any]) -> None:
        self.write("eval", record)
        self.message(
            f"step {record['step']}: eval_loss {record['eval_loss']:.4f}, "
            f"eval_accuracy {record['eval_accuracy']:.4f}, perplexity {record['perplexity']:.2f}"
        )

    def write(self, group: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(self.elapsed(), 3)}
        self.jsonl.write(strict_json(record) + "\n")
        self.jsonl.flush()
        scalars = scalar_names(group, record)
        if self.board is not None:
            self.board.add_scalars(scalars, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def sync(self) -> None:
        """A gs:// output_dir: copy metrics.jsonl and the TensorBoard events there (at every
        checkpoint and at the end; a resumed run drops the lines after its checkpoint anyway)."""
        if self.staging is None:
            return
        self.jsonl.flush()
        copy_into(self.staging, self.output_dir)

    def close(self) -> None:
        self.bar.close()
        self.sync()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.board is not None:
            self.board.close()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self.wandb is not None:
            self.wandb.finish()
