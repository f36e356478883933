"""The README is the front door: its flag table and commands must stay true."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from flax_lm.cli import COMMANDS
from flax_lm.train.args import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_training_flag_is_in_the_flag_table():
    table = {m.group(1) for m in re.finditer(r"^\| `--(\w+)`", README, flags=re.M)}
    flags = {f.name for f in dataclasses.fields(TrainConfig)}
    assert flags - table == set(), "flags missing from the README table"
    assert table - flags == set(), "README table lists flags that do not exist"


def test_commands_and_files_named_in_the_readme_exist():
    commands = re.findall(r"(?:^|&& |`)flax-lm ([a-z-]+)", README, flags=re.M)
    assert {"quickstart", "train-tokenizer", "create-config", "generate"} <= set(commands)
    for name in commands:
        assert name in COMMANDS, name
    for path in re.findall(r"(configs/[\w.-]+\.(?:yaml|json|py))", README):
        assert (ROOT / path).is_file(), path
    for script in ("run_clm_flax.py", "run_mlm_flax.py", "tokenizer/train_tokenizer.py"):
        assert (ROOT / script).is_file() and (ROOT / script).stat().st_mode & 0o111, script


def test_the_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "JAX_PLATFORMS=cpu pytest" in README
    assert "JAX_PLATFORMS=cpu pytest" in ci
    assert "torch==2.13.0" in ci and "torch==2.13.0" in README
