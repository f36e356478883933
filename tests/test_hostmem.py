"""Huge pages for host memory (flax_lm/hostmem.py): the environment it sets, which commands
re-execute themselves with it and on which platforms (flax_lm/backend.py, decided before JAX
starts). How much it speeds a step up is bench/bench.py's to measure."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flax_lm.commands import cli
from flax_lm.hostmem import MODEL_COMMANDS, OPT_OUT, TUNABLE, huge_pages_env, huge_pages_set

GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC_LINUX, reason="glibc tunables exist only on glibc")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without huge-page settings, for JAX on the CPU (whatever the machine)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


@needs_glibc
def test_tunable_is_added_and_other_tunables_are_kept():
    assert huge_pages_env({}, "cpu")["GLIBC_TUNABLES"] == f"{TUNABLE}=1"
    env = huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/x"}, "cpu")
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"
    assert env["HOME"] == "/x"
    assert huge_pages_set(env)


def test_nothing_to_do_when_opted_out_or_already_chosen():
    assert huge_pages_env({OPT_OUT: "0"}, "cpu") is None
    assert huge_pages_env({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, "cpu") is None  # the user's choice
    assert not huge_pages_set({"GLIBC_TUNABLES": f"{TUNABLE}=0"})


@pytest.mark.parametrize("accelerator", ["cuda", "rocm", "tpu", "gpu"])
def test_nothing_to_do_when_an_accelerator_computes(accelerator):
    assert huge_pages_env({}, accelerator) is None
    assert huge_pages_env({"JAX_PLATFORMS": accelerator}) is None


def test_only_the_commands_that_run_a_model_reexecute(monkeypatch):
    """`flax-lm COMMAND`: training, quickstart and evaluate re-execute; plot, export, plan,
    train-tokenizer... start as they are."""
    reexecuted = []
    monkeypatch.setattr(cli, "reexec_with_huge_pages", lambda: reexecuted.append(command))

    class Command:
        @staticmethod
        def main(argv, **objective):
            return 0

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: Command)
    for command in cli.COMMANDS:
        monkeypatch.setattr(sys, "argv", ["flax-lm", command])
        assert cli.main() == 0
    assert set(reexecuted) == MODEL_COMMANDS == {"quickstart", "run-clm", "run-mlm", "evaluate"}
    assert cli.main(["run-clm"]) == 0 and len(reexecuted) == 4  # called as a library: never


REEXEC_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from flax_lm.hostmem import reexec_with_huge_pages
    print("start", os.getpid(), sys.argv[1:], flush=True)
    reexec_with_huge_pages()
    print("running", os.getpid(), sys.argv[1:], os.environ.get("GLIBC_TUNABLES"))
    """
)


@needs_glibc
def test_command_reexecutes_itself_once_with_same_pid_and_arguments(tmp_path: Path):
    script = tmp_path / "command.py"
    script.write_text(REEXEC_SCRIPT)
    result = subprocess.run([sys.executable, str(script), "--flag", "a b"], env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    pid = lines[0].split()[1]
    assert lines == [f"start {pid} ['--flag', 'a b']"] * 2 + [
        f"running {pid} ['--flag', 'a b'] {TUNABLE}=1"]

    for unchanged in ({OPT_OUT: "0"}, {"JAX_PLATFORMS": "cuda"}):
        done = subprocess.run([sys.executable, str(script)], env=clean_env(**unchanged),
                              capture_output=True, text=True, timeout=60)
        assert done.stdout.count("start") == 1 and done.stdout.endswith("None\n"), unchanged
