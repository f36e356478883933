"""The metrics files' numbers: perplexity that never overflows, strict JSON (no NaN or Infinity
that other tools cannot read) and, after a resume, no records from beyond the checkpoint."""

from __future__ import annotations

import json
import math

from flax_lm.train.metrics import keep_records_up_to, perplexity, strict_json, write_json


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
