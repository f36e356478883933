#!/usr/bin/env python3
"""Time `flax-lm train-tokenizer` on ~10 MB of Python standard library source (vocab 50265).

    python bench/tokenizer_speed.py [--megabytes 10] [--vocab_size 50265]

Prints the corpus size, wall seconds, MB/s and CPU seconds for the whole command (reading,
training, saving); on a shared machine the CPU figure is the steadier one.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

try:
    import flax_lm  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flax_lm.commands.train_tokenizer import main as train_tokenizer_main


def stdlib_sources(megabytes: float) -> list[Path]:
    """Sorted stdlib .py files (no site-packages) until `megabytes` MB are collected."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or path.stat().st_size == 0:
            continue
        files.append(path)
        total += path.stat().st_size
        if total >= megabytes * 1e6:
            break
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=10.0)
    parser.add_argument("--vocab_size", type=int, default=50265)
    args = parser.parse_args()
    files = stdlib_sources(args.megabytes)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    with tempfile.TemporaryDirectory() as output_dir:
        start, cpu_start = time.perf_counter(), time.process_time()
        status = train_tokenizer_main(
            [
                "--train_file",
                *map(str, files),
                "--vocab_size",
                str(args.vocab_size),
                "--output_dir",
                output_dir,
                "--overwrite_output_dir",
            ]
        )
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if status:
        sys.exit(status)
    print(
        f"tokenizer training: {megabytes:.1f} MB ({len(files)} files), vocab {args.vocab_size}: "
        f"{seconds:.1f} s, {megabytes / seconds:.2f} MB/s ({cpu_seconds:.1f} CPU s, all threads)"
    )


if __name__ == "__main__":
    main()
