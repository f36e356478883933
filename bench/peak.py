#!/usr/bin/env python3
"""Peak matmul throughput of this machine, the denominator of MFU.

JAX: a chain of square matmuls inside one jitted `fori_loop` (each product feeds the next, so XLA
can neither hoist nor skip any), best of several timed calls after a warm-up call. The matrix is
scaled by 1/sqrt(n) so values neither overflow nor turn denormal (denormals are slow on CPUs).
PyTorch's `torch.mm` is measured the same way, for reference: it is what the Trainer peer runs on.

    python bench/peak.py [--sizes 1024,2048] [--iters 8] [--repeats 3] [--out peak.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

DTYPES = ("float32", "bfloat16")
MAX_CALL_SECONDS = 2.0


def matmul_flops(n: int, iters: int) -> float:
    return 2.0 * n**3 * iters


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def best_seconds(run, repeats: int) -> float:
    """Minimum wall time of `run()` over `repeats` calls."""
    return min(timed(run) for _ in range(repeats))


def jax_chain(dtype: str, n: int, iters: int):
    """A call running `iters` chained n x n matmuls compiled by XLA."""
    import jax
    import jax.numpy as jnp

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = (jax.random.normal(key_b, (n, n), jnp.float32) / n**0.5).astype(dtype)

    @jax.jit
    def chain(x, w):
        return jax.lax.fori_loop(0, iters, lambda _, y: jnp.dot(y, w), x)

    return lambda: chain(a, b).block_until_ready()


def torch_chain(dtype: str, n: int, iters: int):
    """A call running `iters` chained n x n `torch.mm` (on the GPU when torch has one)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device, torch_dtype)
    b = (torch.randn(n, n, generator=generator) / n**0.5).to(device, torch_dtype)

    def chain():
        y = a
        for _ in range(iters):
            y = torch.mm(y, b)
        return y

    def run():
        with torch.inference_mode():
            chain()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def peak_flops(make_chain, dtype: str, sizes: list[int], iters: int, repeats: int) -> float:
    """Best FLOP/s over sizes, smallest first. A larger size is skipped when its call would take
    over MAX_CALL_SECONDS (time grows as n^3): CPUs without native bfloat16 run it ~100x slower."""
    best = 0.0
    sizes = sorted(sizes)
    for n, next_n in zip(sizes, sizes[1:] + [None], strict=True):
        run = make_chain(dtype, n, iters)
        timed(run)  # warm-up: compilation, thread pools, caches
        seconds = best_seconds(run, repeats)
        best = max(best, matmul_flops(n, iters) / seconds)
        if next_n and seconds * (next_n / n) ** 3 > MAX_CALL_SECONDS:
            break
    return best


def measure_peaks(sizes: list[int], iters: int, repeats: int) -> dict:
    """{"jax": {"float32": FLOP/s, "bfloat16": ...}, "torch": {...}, "sizes": [...], ...}."""
    chains = {"jax": jax_chain, "torch": torch_chain}
    peaks: dict = {"sizes": sizes, "iters": iters, "repeats": repeats}
    for framework, make_chain in chains.items():
        peaks[framework] = {
            dtype: peak_flops(make_chain, dtype, sizes, iters, repeats) for dtype in DTYPES
        }
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048", help="comma-separated matrix sizes")
    parser.add_argument("--iters", type=int, default=8, help="chained matmuls per timed call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per size (best kept)")
    parser.add_argument("--out", help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    peaks = measure_peaks(sizes, args.iters, args.repeats)
    for framework in ("jax", "torch"):
        figures = ", ".join(f"{d} {peaks[framework][d] / 1e9:.1f}" for d in DTYPES)
        print(f"{framework:<6} matmul peak GFLOP/s: {figures}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(peaks, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
