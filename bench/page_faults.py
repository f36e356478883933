#!/usr/bin/env python3
"""Page faults of a large host allocation with and without huge pages (flax_lm/hostmem.py).

    python bench/page_faults.py [--megabytes 256]

Runs a child process that mallocs a block the size of a small model's step temporaries and
writes it, once as started and once with the environment the training commands re-execute
with (glibc.malloc.hugetlb=1), and prints the minor page faults of each. With 4 KiB pages a
256 MB block takes 65,536 faults; in 2 MiB transparent huge pages, 128 (where the kernel's THP
mode is `madvise` or `always` and it has huge pages to give).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

try:
    import flax_lm  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flax_lm.hostmem import OPT_OUT, huge_pages_env

FAULTS_SCRIPT = """
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = int(sys.argv[1]) << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)
ctypes.memset(block, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(environ: dict[str, str], megabytes: int) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, str(megabytes)], env=environ,
                          check=True, capture_output=True, text=True, timeout=120)
    return int(done.stdout)


def thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else "unavailable"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=256)
    args = parser.parse_args()
    started = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    huge = huge_pages_env(started, "cpu")
    if huge is None:
        print("no huge-page tunable here (glibc on Linux only)", file=sys.stderr)
        return 1
    small_pages, huge_pages = faults(started, args.megabytes), faults(huge, args.megabytes)
    print(f"{args.megabytes} MB malloc'd and written, transparent huge pages: {thp_mode()}")
    print(f"  as started:           {small_pages:>8,} page faults")
    print(f"  glibc.malloc.hugetlb: {huge_pages:>8,} page faults "
          f"({small_pages / max(huge_pages, 1):.0f}x fewer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
