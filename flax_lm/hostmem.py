"""Host memory: back large allocations with transparent huge pages (Linux, glibc).

XLA:CPU allocates a step's temporary buffers afresh at every step, glibc maps each large block
anew, and the kernel faults it in one base page at a time: a small model's step spends a large
share of its CPU time in the kernel. With glibc's `glibc.malloc.hugetlb=1` tunable, malloc asks
for transparent huge pages on those mappings (where the kernel's THP mode is `madvise` or
`always`): one fault per huge page instead of one per base page, the same peak memory.
bench/page_faults.py counts the faults; docs/performance.md ("Host memory in huge pages") gives
the step times measured with and without it.

glibc reads its tunables once, when a process starts, so the commands that run a model's
compiled steps (MODEL_COMMANDS) re-execute themselves with the tunable added before doing
anything else, when JAX will compute on the CPU (flax_lm/backend.py host_huge_pages): on a GPU or
TPU the steps' buffers live in device memory. Set FLAX_LM_HUGE_PAGES=0 to keep the process as it
was started.
"""

from __future__ import annotations

import os
import platform
import sys

from flax_lm.backend import choices_for, startup_platform

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "FLAX_LM_HUGE_PAGES"
# `flax-lm` commands that run a model's compiled steps over many batches: training (quickstart
# trains too) and evaluation. The others read and write files, compile without running (plan),
# or run small steps (generate, fill-mask), where the faults were not measured to matter.
MODEL_COMMANDS = frozenset({"quickstart", "run-clm", "run-mlm", "evaluate"})


def huge_pages_env(
    environ: dict[str, str], platform_name: str | None = None
) -> dict[str, str] | None:
    """The environment with the huge-page tunable added, or None when there is nothing to add:
    not glibc on Linux, JAX will not compute on the CPU (`platform_name`, by default the one JAX
    will start with `environ`), opted out, or GLIBC_TUNABLES already sets it (the user's choice
    wins)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    if environ.get(OPT_OUT, "1") == "0":
        return None
    if not choices_for(platform_name or startup_platform(environ)).host_huge_pages:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))}


def huge_pages_set(environ: dict[str, str]) -> bool:
    """Whether a process with this environment started with the tunable on."""
    return f"{TUNABLE}=1" in environ.get("GLIBC_TUNABLES", "").split(":")


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command with the huge-page tunable set (same pid,
    arguments and standard streams), where huge_pages_env adds it. Call it first thing in the
    entry point of a command that runs a model (MODEL_COMMANDS), before JAX is imported."""
    env = huge_pages_env(dict(os.environ))
    if env is None or not sys.executable:  # nothing to add, or an embedded interpreter
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # the process goes on as it was: slower steps, same results
        return
