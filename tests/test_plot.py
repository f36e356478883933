"""`flax-lm plot`: a real PNG from metrics.jsonl; one-line errors for missing or bad metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from PIL import Image

from flax_lm.commands.plot import main
from flax_lm.plot import read_metrics

pytest_plugins = ["fixtures_models"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir: Path, steps: int = 200) -> Path:
    """A plausible metrics.jsonl: warmup then linear decay, falling loss, an eval every 50 steps."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(10, steps + 1, 10):
        loss = 6.0 * math.exp(-step / 60) + 2.0
        lr = 1e-3 * min(step / 40, (steps - step) / (steps - 40))
        lines.append(
            {
                "step": step,
                "epoch": step / 100,
                "loss": loss,
                "learning_rate": lr,
                "grad_norm": 1.0 + 1 / step,
                "tokens_per_second": 5000.0 + step,
                "time": step / 10,
            }
        )
        if step % 50 == 0:
            lines.append(
                {
                    "step": step,
                    "eval_loss": loss + 0.1,
                    "eval_accuracy": 0.5 - 1 / step,
                    "perplexity": math.exp(loss + 0.1),
                    "time": step / 10,
                }
            )
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def assert_real_png(path: Path, min_size=(800, 500)) -> None:
    """PNG bytes, a sensible size, and drawn content (not one flat colour)."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 10.0  # white background with dark axes and coloured curves
    assert (pixels < 128).mean() > 0.005  # at least 0.5% dark pixels: text, axes and lines


def test_plot_writes_png_from_metrics(tmp_path, capsys):
    write_metrics(tmp_path / "run")
    assert main([str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "metrics.png"
    assert_real_png(out)
    assert str(out) in capsys.readouterr().out


def test_plot_of_a_real_training_run(tiny_gpt2_run, tmp_path):
    train, evals = read_metrics(tiny_gpt2_run.output_dir / "metrics.jsonl")
    assert [r["step"] for r in evals] == [15, 30] and len(train) == 6
    out = tmp_path / "run.png"
    assert main([str(tiny_gpt2_run.output_dir), "--out", str(out)]) == 0
    assert_real_png(out)


def test_plot_out_flag_and_resumed_run(tmp_path):
    metrics = write_metrics(tmp_path / "run")
    # A resumed run logs step 100 again: the later record wins.
    with metrics.open("a", encoding="utf-8") as f:
        f.write(
            json.dumps(
                {
                    "step": 100,
                    "epoch": 1.0,
                    "loss": 1.5,
                    "learning_rate": 1e-4,
                    "grad_norm": 1.0,
                    "tokens_per_second": 4000.0,
                    "time": 99.0,
                }
            )
            + "\n"
        )
    train, evals = read_metrics(metrics)
    assert [r["step"] for r in train] == list(range(10, 201, 10))
    assert next(r for r in train if r["step"] == 100)["loss"] == 1.5
    assert [r["step"] for r in evals] == [50, 100, 150, 200]
    out = tmp_path / "custom.png"
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 0
    assert_real_png(out)
    assert not (tmp_path / "run" / "metrics.png").exists()


def test_plot_eval_only_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps(
            {"step": 0, "eval_loss": 6.2, "eval_accuracy": 0.01, "perplexity": 492.7, "time": 1.0}
        )
        + "\n",
        encoding="utf-8",
    )
    assert main([str(run)]) == 0
    assert_real_png(run / "metrics.png")


@pytest.mark.parametrize(
    "content, names",
    [
        (None, ("metrics.jsonl",)),
        ("", ("metrics",)),
        ('{"step": 1, "loss": 2.0}\n{"step": 2, "loss"\n', ("metrics.jsonl:2", "JSON")),
        ('{"loss": 2.0}\n', ("metrics.jsonl:1", "'step'")),
    ],
)
def test_plot_bad_metrics_is_one_line_error(tmp_path, capsys, content, names):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content, encoding="utf-8")
    before = sorted(p.name for p in run.iterdir())
    assert_one_line_error((main([str(run)]), capsys.readouterr().err), str(run), *names)
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize(
    "args, names",
    [
        (["{missing}"], ("{missing}", "not a directory")),
        (["{run}", "--out", "{run}/plot.jpg"], ("--out", "{run}/plot.jpg", ".png")),
        (["{run}", "--out", "{run}/nowhere/plot.png"], ("{run}/nowhere", "not exist")),
        (["{run}", "--outt", "x.png"], ("'--outt'", "--out")),
    ],
)
def test_plot_bad_arguments(tmp_path, capsys, args, names):
    run = tmp_path / "run"
    write_metrics(run)
    paths = {"run": run, "missing": tmp_path / "missing"}
    argv = [a.format(**paths) for a in args]
    names = [name.format(**paths) for name in names]
    assert_one_line_error((main(argv), capsys.readouterr().err), *names)
    assert not (run / "metrics.png").exists()
