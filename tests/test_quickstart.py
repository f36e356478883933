"""`flax-lm quickstart` in miniature: every stage runs, the model learns, the outputs are usable."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from conftest import assert_one_line_error
from PIL import Image

from flax_lm.commands.quickstart import (
    CALIBRATION_STEPS,
    PROMPT,
    VALIDATION_EVERY,
    is_validation,
    main,
    stdlib_modules,
    steps_in,
)

MINI = [
    "--minutes", "0.1", "--max_files", "60", "--vocab_size", "512", "--block_size", "64",
    "--config_overrides", "n_embd=64,n_layer=2,n_head=4,n_positions=64",
]  # fmt: skip


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """(exit status, output_dir, what it printed) of one miniature quickstart."""
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["--output_dir", str(out), *MINI])
    return status, out, printed.getvalue()


def test_split_by_file_is_fixed_and_skips_tests():
    root, modules = stdlib_modules()
    assert modules == stdlib_modules()[1] == sorted(modules)
    assert not any({"test", "tests", "encodings"} & set(m.parts[:-1]) for m in modules)
    validation = [m for i, m in enumerate(modules) if is_validation(i)]
    assert 0.01 < len(validation) / len(modules) < 0.03  # a fixed 2%: every 50th module
    assert validation == modules[VALIDATION_EVERY // 2 :: VALIDATION_EVERY]


def test_minutes_become_steps():
    assert steps_in(4, 0.2) == 1200  # 240 s at 0.2 s/step
    assert steps_in(4, 0.0123) == 20000  # 19,512 to two significant digits
    assert steps_in(0.1, 0.041) == 150  # 146
    assert steps_in(0.01, 1.0) == CALIBRATION_STEPS  # never fewer than the measured run


@pytest.mark.slow
def test_mini_quickstart_learns_and_exports(mini_run):
    status, out, printed = mini_run
    assert status == 0
    assert all(f"[{n}/7]" in printed for n in range(1, 8))
    assert "held-out perplexity" in printed and str(out / "model") in printed
    results = json.loads((out / "quickstart_results.json").read_text())
    untrained, trained = results["untrained"], results["trained"]
    # An untrained model is close to a uniform guess over the 512-token vocabulary...
    assert 512 / 1.5 < untrained["perplexity"] < 512 * 1.5
    # ...and a few seconds of training cut the perplexity by more than a third.
    assert trained["perplexity"] < 0.66 * untrained["perplexity"]
    assert results["train"]["train_steps"] >= 6  # the time box gave at least the measured steps
    assert results["completion"].startswith(PROMPT) and len(results["completion"]) > len(PROMPT)

    corpus = results["corpus"]
    train = {p.relative_to(out / "data" / "train") for p in (out / "data" / "train").rglob("*.py")}
    valid = {
        p.relative_to(out / "data" / "validation")
        for p in (out / "data" / "validation").rglob("*.py")
    }
    assert len(train) == corpus["train_files"] and len(valid) == corpus["validation_files"] >= 1
    assert not train & valid and len(train | valid) == 60

    model = out / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl"):
        assert (model / name).is_file(), name
    assert not (out / "calibration").exists()
    with Image.open(model / "metrics.png") as image:
        assert image.size[0] > 800


@pytest.mark.slow
def test_rerun_needs_overwrite(mini_run, capsys):
    _, out, _ = mini_run
    before = sorted(p.name for p in out.iterdir())
    status = main(["--output_dir", str(out), *MINI])
    assert_one_line_error((status, capsys.readouterr().err), str(out), "--overwrite_output_dir")
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize(
    "args, names",
    [
        (["--minutes", "0"], ("--minutes", "positive", "0")),
        (["--max_files", "3"], ("--max_files", "3")),
        (["--vocab_size", "100"], ("vocab_size 100", "261")),
        (["--minuts", "1"], ("'--minuts'", "--minutes")),
    ],
)
def test_bad_flags(tmp_path, capsys, args, names):
    status = main(["--output_dir", str(tmp_path / "qs"), *args])
    assert_one_line_error((status, capsys.readouterr().err), *names)
    assert not (tmp_path / "qs").exists()
