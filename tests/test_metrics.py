"""The metrics files' numbers: perplexity that never overflows, strict JSON (no NaN or Infinity
that other tools cannot read) and, after a resume, no records from beyond the checkpoint."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import struct
from pathlib import Path

import pytest
from conftest import small_filesystem

from flax_lm.train.metrics import (
    EventFile,
    keep_records_up_to,
    perplexity,
    strict_json,
    write_json,
)


def test_perplexity_never_overflows():
    assert perplexity(0.0) == 1.0
    assert perplexity(2.0) == math.exp(2.0)
    assert perplexity(1e4) == math.inf  # exp would overflow


def test_result_files_are_strict_json(tmp_path):
    line = strict_json({"step": 1, "loss": float("nan"), "perplexity": math.inf, "lr": 1e-3})
    assert json.loads(line) == {"step": 1, "loss": None, "perplexity": None, "lr": 1e-3}
    write_json(tmp_path / "r.json", {"eval_loss": 1e4, "perplexity": perplexity(1e4)})
    text = (tmp_path / "r.json").read_text()
    assert "Infinity" not in text and json.loads(text)["perplexity"] is None


def test_resumed_runs_drop_metrics_logged_after_their_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 9)))
    keep_records_up_to(path, 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def tensorboard_scalars(logdir: Path) -> list[tuple[int, str, float]]:
    """(step, name, value) of every scalar in logdir's event files, read as TensorBoard reads
    them (records: length, its CRC, the serialized Event, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    found = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            found += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return found


def test_tensorboard_events_hold_each_scalar_at_its_step(tmp_path):
    board = EventFile(tmp_path / "runs")
    board.add_scalars({"train/loss": 2.5, "train/learning_rate": 0.001}, 1)
    board.add_scalars({"eval/loss": 2.0}, 2)
    board.close()
    assert tensorboard_scalars(tmp_path / "runs") == [
        (1, "train/loss", 2.5), (1, "train/learning_rate", pytest.approx(0.001)),
        (2, "eval/loss", 2.0),
    ]  # fmt: skip


def test_a_full_disk_under_tensorboard_is_an_oserror_at_once(tmp_path, monkeypatch):
    """No writer thread that dies and leaves the run waiting: the write that finds no space
    raises ENOSPC where the run can report it."""
    with small_filesystem(tmp_path / "disk", "32k") as mounted:
        board = EventFile(tmp_path / "disk" / "runs")
        if not mounted:  # the disk fills after a few records
            from tensorboardX import record_writer

            write, written = record_writer.RecordWriter.write, []

            def write_until_full(writer, data):
                written.append(data)
                if len(written) > 20:
                    raise OSError(errno.ENOSPC, "No space left on device")
                write(writer, data)

            monkeypatch.setattr(record_writer.RecordWriter, "write", write_until_full)
        with pytest.raises(OSError) as raised:
            for step in range(100_000):
                board.add_scalars({"train/loss": float(step)}, step)
        assert raised.value.errno == errno.ENOSPC
        with pytest.raises(OSError) if mounted else contextlib.nullcontext():
            board.close()  # what is left to write still finds no space; the file is closed
