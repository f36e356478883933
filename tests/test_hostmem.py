"""Huge pages for host memory (flax_lm/hostmem.py): the environment it sets, the re-execution
of a command, and that glibc then really faults large allocations in far fewer pages."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flax_lm.hostmem import OPT_OUT, TUNABLE, huge_pages_env, huge_pages_set

GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC_LINUX, reason="glibc tunables exist only on glibc")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    return {**env, **extra}


@needs_glibc
def test_tunable_is_added_and_other_tunables_are_kept():
    assert huge_pages_env({})["GLIBC_TUNABLES"] == f"{TUNABLE}=1"
    env = huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/x"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"
    assert env["HOME"] == "/x"
    assert huge_pages_set(env)


def test_nothing_to_do_when_opted_out_or_already_chosen():
    assert huge_pages_env({OPT_OUT: "0"}) is None
    assert huge_pages_env({"GLIBC_TUNABLES": f"{TUNABLE}=0"}) is None  # the user's choice wins
    assert not huge_pages_set({"GLIBC_TUNABLES": f"{TUNABLE}=0"})


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

    opted_out = subprocess.run([sys.executable, str(script)], env=clean_env(**{OPT_OUT: "0"}),
                               capture_output=True, text=True, timeout=60)
    assert opted_out.stdout.count("start") == 1 and opted_out.stdout.endswith("None\n")


FAULTS_SCRIPT = textwrap.dedent(
    """
    import ctypes, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 256 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else "unavailable"


@needs_glibc
@pytest.mark.skipif(thp_mode() != "madvise", reason="the tunable changes faults in madvise mode")
def test_tunable_cuts_page_faults_of_a_large_allocation():
    """256 MB malloc'd and written: 65,536 faults in 4 KiB pages; in 2 MiB pages, 128 (a 10x
    margin leaves room for the kernel falling back to small pages for some of it)."""

    def faults(env):
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], env=env, check=True,
                             capture_output=True, text=True, timeout=60).stdout
        return int(out)

    small_pages = faults(clean_env())
    huge_pages = faults(huge_pages_env(clean_env()))
    assert small_pages >= 60_000
    assert huge_pages * 10 <= small_pages, (huge_pages, small_pages)
