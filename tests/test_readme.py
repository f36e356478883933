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


def readme_install_and_test() -> list[str]:
    """The README's one line that installs and runs the test suite, as its separate commands."""
    (line,) = [line for line in README.splitlines() if "&&" in line and line.endswith(" pytest")]
    return [command.strip() for command in line.split("&&")]


def ci_commands() -> list[str]:
    """The commands .ci/run runs, pip spelled as the README spells it (no `python -m`, `--quiet`)."""
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return [re.sub(r"^python -m pip install --quiet ", "pip install ", c) for c in commands]


def test_ci_runs_the_readmes_install_and_test_commands():
    """Whoever follows the README installs what CI installs (the same pinned torch the parity
    tests compare against) and runs the suite the way CI runs it, in the same order."""
    readme, ci = readme_install_and_test(), ci_commands()
    assert [command for command in ci if command in readme] == readme, (readme, ci)
    assert any(command.startswith("pip install torch==") for command in readme)
    assert ci[-1] == readme[-1] == "JAX_PLATFORMS=cpu pytest"
