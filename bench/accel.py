#!/usr/bin/env python3
"""Training throughput on an accelerator: flax-lm's train step against PyTorch as GPU users run it.

    python bench/bench.py --device gpu [--configs gpt2-124m,roberta-base] [--steps 30]
    python bench/accel.py [same options]   # on whatever device JAX and torch find (CPU included)

Every measurement runs in its own process, so neither framework holds the other's memory:
- the matmul peak: bench/peak.py (JAX and torch, bfloat16 and float32) on this device;
- flax-lm: the trainer's own train step (bench/profile_step.build_step: model, objective, AdamW
  with clipping and the finite-update guard, state donated), bfloat16, attention as
  `--attn_implementation` chooses, on random token ids (no dataset library needed);
- PyTorch: transformers' model of the same config with SDPA attention, bfloat16 autocast, fused
  AdamW, clipping at 1.0, eager and with `torch.compile`.
Tokens/s is steady state over --steps steps after WARMUP_STEPS; compile seconds are flax-lm's
ahead-of-time compile and torch's first step; peak device memory is JAX's peak_bytes_in_use and
torch.cuda.max_memory_allocated (None on a CPU). MFU is against the bfloat16 matmul peak measured
in the same run and against the card's published dense bfloat16 peak (perf.PUBLISHED_BF16_PEAKS).
A failed measurement (e.g. torch.compile without a compiler) is recorded and the run goes on.

The loss check: flax-lm's step saves its initial model as PyTorch loads it (config.json,
model.safetensors), its batch and its learning rate of every step; each PyTorch side starts from
those weights, trains on those token ids (MLM masks included) with that schedule, and records
its loss at every step as flax-lm does. Both curves go in the results; the run fails when
flax-lm's loss differs from a PyTorch side's at the first step or the last by more than
LOSS_TOLERANCE. A fast attention kernel with a wrong mask (future tokens leaking, padding
ignored) shows there as a loss that falls faster than PyTorch's, not as a speed-up.
Writes bench/results/<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import CONFIGS, HYPERPARAMETERS, TOKENIZER_VOCAB, BenchConfig
from flax_lm import perf

BENCH = Path(__file__).resolve().parent
MEASURE = "--measure"  # how this script calls itself for one measurement
WARMUP_STEPS = 3
VOCAB = 37_902  # a byte-level BPE trained on a code corpus: the vocabulary GPT-2 runs train with
ACCEL_CONFIGS: dict[str, tuple[BenchConfig, tuple[int, ...]]] = {
    # name: (model, shapes and learning rate; batch sizes measured)
    "gpt2-124m": (BenchConfig("clm", f"vocab_size={VOCAB}", 512, 32, 1000, 1e-4, False), (32, 64)),
    "roberta-base": (BenchConfig("mlm", f"vocab_size={VOCAB}", 128, 128, 1000, 1e-4, False),
                     (128,)),
    # the harness itself, in seconds on a CPU
    "micro-clm": (CONFIGS["micro-clm"], (4,)),
    "micro-mlm": (BenchConfig("mlm", "hidden_size=32,intermediate_size=64,num_hidden_layers=1,"
                              "num_attention_heads=2", 32, 4, 4, 1e-3, True), (4,)),
}
DEFAULT_CONFIGS = "gpt2-124m,roberta-base"
# How far flax-lm's loss may be from PyTorch's, relative to PyTorch's, at the first step (same
# weights, same tokens: only bfloat16 rounding differs, ~3 significant digits per product) and
# at the last (rounding differences compounded through the updates).
LOSS_TOLERANCE = {"first": 0.02, "last": 0.05}

def model_config(bench: BenchConfig, dropout: float | None = None):
    """The transformers config both sides build (as profile_step.build_step does)."""
    from flax_lm.config import build_config

    overrides = bench.overrides
    if bench.tokenizer_vocab:
        overrides += f",vocab_size={TOKENIZER_VOCAB}"
    return build_config(bench.model_type, dropout=dropout, overrides=overrides or None)


def device_slug(device_kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "device"


# ----------------------------------------------------------------- measurements (own process)


def measure_ours(spec: dict) -> dict:
    import jax
    from profile_step import LAYERS, build_step

    from flax_lm.backend import choices_for, platform
    from flax_lm.models.attention import choose_attention

    bench = BenchConfig(**spec["config"])
    scan_layers = LAYERS[spec.get("layers", "auto")]
    if scan_layers is None:  # named in the results, so resolved here as create_model would
        scan_layers = choices_for(platform()).scan_layers
    compiled, compile_seconds, state, batch, config = build_step(
        bench, scan_layers=scan_layers, dtype=spec["dtype"], attention=spec["attention"],
        dropout=spec["dropout"], batch_size=spec["batch_size"], save_to=spec.get("peer_dir"))
    steps = []  # every step's metrics, read back after the timing
    for _ in range(WARMUP_STEPS):
        state, metrics = compiled(state, batch)
        steps.append(metrics)
    jax.block_until_ready(metrics)
    started = time.perf_counter()
    for _ in range(spec["steps"]):
        state, metrics = compiled(state, batch)
        steps.append(metrics)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - started
    losses = [float(m["loss_sum"] / m["num_targets"]) for m in jax.device_get(steps)]
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {
        "tokens_per_second": spec["steps"] * bench.seq_len * spec["batch_size"] / seconds,
        "step_seconds": seconds / spec["steps"],
        "compile_seconds": compile_seconds,
        "peak_memory_gb": stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats
        else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
        "attention": choose_attention(platform(), spec["dtype"], spec["attention"]),
        "layers": "scanned" if scan_layers else "unrolled",
        "device_kind": device.device_kind,
        "platform": device.platform,
        "vocab_size": config.vocab_size,
    }


def peer_start(peer_dir: str, cls, device):
    """flax-lm's initial model, batch and learning rates as build_step saved them."""
    import numpy as np
    import torch
    from profile_step import PEER_BATCH

    model = cls.from_pretrained(peer_dir, attn_implementation="sdpa").to(device).train()
    saved = np.load(Path(peer_dir) / PEER_BATCH)
    ids, labels = (torch.from_numpy(saved[k].astype(np.int64)).to(device)
                   for k in ("input_ids", "labels"))
    return model, ids, labels, saved["learning_rates"].tolist()


def torch_batch(bench: BenchConfig, batch_size: int, vocab_size: int, device):
    """Random token ids; MLM: 15% of the positions are targets, 80% of them shown as <mask> (4)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (batch_size, bench.seq_len), generator=generator)
    if bench.objective == "clm":
        return ids.to(device), ids.to(device)
    is_target = torch.rand(ids.shape, generator=generator) < 0.15
    labels = torch.where(is_target, ids, -100)
    masked = is_target & (torch.rand(ids.shape, generator=generator) < 0.8)
    return torch.where(masked, 4, ids).to(device), labels.to(device)


def measure_torch(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    bench = BenchConfig(**spec["config"])
    config = model_config(bench, spec["dropout"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cls = AutoModelForCausalLM if bench.objective == "clm" else AutoModelForMaskedLM
    rates = None
    if spec.get("peer_dir"):
        model, ids, labels, rates = peer_start(spec["peer_dir"], cls, device)
    else:
        model = cls.from_config(config, attn_implementation="sdpa").to(device).train()
        ids, labels = torch_batch(bench, spec["batch_size"], config.vocab_size, device)
    if bench.objective == "clm":
        model.loss_type = "ForCausalLM"  # the per-token mean, as flax-lm's
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": HYPERPARAMETERS["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=bench.learning_rate, betas=(HYPERPARAMETERS["adam_beta1"],
                                       HYPERPARAMETERS["adam_beta2"]),
        eps=HYPERPARAMETERS["adam_epsilon"], fused=True)
    forward = torch.compile(model) if spec["mode"] == "compile" else model
    losses = []

    def step() -> torch.Tensor:
        if rates is not None:  # flax-lm's schedule, step by step
            for group in optimizer.param_groups:
                group["lr"] = rates[min(len(losses), len(rates) - 1)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HYPERPARAMETERS["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        return loss.detach()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    first_loss = float(step())
    compile_seconds = time.perf_counter() - started
    for _ in range(WARMUP_STEPS - 1):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(spec["steps"]):
        loss = step()
    synchronize()
    seconds = time.perf_counter() - started
    return {
        "tokens_per_second": spec["steps"] * bench.seq_len * spec["batch_size"] / seconds,
        "step_seconds": seconds / spec["steps"],
        "compile_seconds": compile_seconds,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda"
        else None,
        "first_loss": first_loss,
        "last_loss": float(loss),
        "losses": [float(x) for x in losses],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------------------ orchestration


def repo_env(extra: dict | None = None) -> dict:
    """The environment with this checkout first on PYTHONPATH (flax_lm need not be installed)."""
    path = os.pathsep.join(filter(None, (str(BENCH.parent), os.environ.get("PYTHONPATH"))))
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def run_measurement(kind: str, spec: dict, work: Path) -> dict:
    """One measurement in a fresh process: its result, or {"error": ...} if it failed."""
    name = f"{kind}-{spec['name']}-{spec['batch_size']}-{spec.get('mode', 'jax')}"
    spec_path, out, log = (work / f"{name}.{ext}" for ext in ("spec.json", "json", "log"))
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, __file__, MEASURE, kind, str(spec_path), str(out)]
    with open(log, "w") as f:
        status = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=BENCH.parent,
                                env=repo_env()).returncode
    if status != 0 or not out.exists():
        tail = log.read_text()[-1500:]
        print(f"  {name} failed ({status}):\n{tail}", flush=True)
        return {"error": tail}
    return json.loads(out.read_text())


def measure_peak(work: Path, sizes: str) -> dict:
    out = work / "peak.json"
    command = [sys.executable, str(BENCH / "peak.py"), "--sizes", sizes, "--iters", "16",
               "--out", str(out)]
    # JAX would otherwise take most of the device's memory before torch's turn
    env = repo_env({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=BENCH.parent)
    if done.returncode != 0:
        sys.exit(f"bench/peak.py failed:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    return json.loads(out.read_text())


def with_mfu(side: dict, flops_per_token: float, measured: float, published: float | None):
    if "error" in side:
        return side
    achieved = perf.achieved_flops_per_second(side["tokens_per_second"], flops_per_token)
    return {**side, "model_tflops": achieved / 1e12, "mfu_measured_peak": achieved / measured,
            "mfu_published_peak": achieved / published if published else None}


def backend(expected: str) -> str:
    """JAX's default backend, found in a throwaway process (this one must not take the GPU)."""
    done = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                          capture_output=True, text=True)
    found = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "none"
    if expected and found != expected:
        print(f"error: --device {expected}, but JAX finds no {expected} (its backend: {found})",
              file=sys.stderr)
        sys.exit(2)
    return found


def run(args: argparse.Namespace, work: Path) -> dict:
    backend(args.expect_platform)
    peak = measure_peak(work, args.peak_sizes)
    results: dict = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {"steps": args.steps, "warmup_steps": WARMUP_STEPS, "dtype": args.dtype,
                     "attn_implementation": args.attn_implementation, "dropout": args.dropout,
                     "layers": args.layers},
        "peak": peak, "runs": [],
    }
    for name, batch_size in measurement_order(args):
        bench = ACCEL_CONFIGS[name][0]
        print(f"{name}, batch {batch_size}", flush=True)
        spec = {"name": name, "config": dataclasses.asdict(bench), "batch_size": batch_size,
                "steps": args.steps, "dtype": args.dtype, "dropout": args.dropout,
                "attention": args.attn_implementation, "layers": args.layers}
        spec["peer_dir"] = str(work / f"start-{name}-{batch_size}")
        ours = run_measurement("ours", spec, work)
        device_kind = ours.get("device_kind", results.get("device_kind", "unknown"))
        results.setdefault("device_kind", device_kind)
        peers = {mode: run_measurement("torch", {**spec, "mode": mode}, work)
                 for mode in torch_modes(args)}
        results["runs"].append(summarise(name, bench, batch_size, ours, peers, results))
        save(results, args)
    return results


def measurement_order(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(config, batch size) pairs, each config's first batch size before any config's second:
    a run cut short by a device's time limit has every config measured once (results are
    saved after each)."""
    sizes = {name: list(ACCEL_CONFIGS[name][1]) if args.batch_size is None else [args.batch_size]
             for name in args.configs.split(",")}
    if args.first_batch_only:
        sizes = {name: s[:1] for name, s in sizes.items()}
    rounds = max(len(s) for s in sizes.values())
    return [(name, s[i]) for i in range(rounds) for name, s in sizes.items() if i < len(s)]


def summarise(name: str, bench: BenchConfig, batch_size: int, ours: dict, peers: dict,
              results: dict) -> dict:
    config = model_config(bench)
    flops = perf.model_flops_per_token(config, bench.seq_len)
    measured = results["peak"]["jax"]["bfloat16"]
    published = perf.published_bf16_peak(results["device_kind"])
    sides = {"flax-lm": ours, **{f"torch {mode}": peer for mode, peer in peers.items()}}
    sides = {label: with_mfu(side, flops, measured, published) for label, side in sides.items()}
    compiled = sides.get("torch compile", {})
    ratio = (ours["tokens_per_second"] / compiled["tokens_per_second"]
             if "tokens_per_second" in ours and "tokens_per_second" in compiled else None)
    checks = {f"torch {mode}": loss_check(ours, peer) for mode, peer in peers.items()
              if "losses" in ours and "losses" in peer}
    return {"config": name, "seq_len": bench.seq_len, "batch_size": batch_size,
            "vocab_size": config.vocab_size, "flops_per_token": flops, "sides": sides,
            "ratio_vs_torch_compile": ratio, "loss_check": checks}


def loss_check(ours: dict, peer: dict) -> dict:
    """flax-lm's loss against a PyTorch side's at the first and the last step they share, each
    within LOSS_TOLERANCE (relative to PyTorch's)."""
    steps = min(len(ours["losses"]), len(peer["losses"]))
    found: dict = {"steps": steps, "tolerance": LOSS_TOLERANCE}
    for which, index in (("first", 0), ("last", steps - 1)):
        a, b = ours["losses"][index], peer["losses"][index]
        difference = abs(a - b) / abs(b) if math.isfinite(a) and math.isfinite(b) else math.inf
        found[which] = {"flax-lm": a, "torch": b, "relative_difference": difference}
    found["ok"] = all(found[w]["relative_difference"] <= LOSS_TOLERANCE[w]
                      for w in ("first", "last"))
    return found


def markdown(results: dict) -> str:
    peak = results["peak"]["jax"]["bfloat16"]
    published = perf.published_bf16_peak(results.get("device_kind", ""))
    lines = [
        f"Device: {results.get('device_kind')}; measured bfloat16 matmul peak (JAX) "
        f"{peak / 1e12:.3g} TFLOP/s; published dense bfloat16 peak "
        f"{f'{published / 1e12:.0f} TFLOP/s' if published else 'unknown'}.",
        "",
        "| config | batch | run | tokens/s | model TFLOP/s | MFU (measured peak) "
        "| MFU (published peak) | compile s | peak memory GB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        for label, side in run["sides"].items():
            shown = f"{label} ({side['layers']})" if "layers" in side else label
            head = f"| {run['config']} | {run['batch_size']} | {shown}"
            if "error" in side:
                lines.append(f"{head} | failed | | | | | |")
                continue
            memory = side["peak_memory_gb"]
            mfu_published = side["mfu_published_peak"]
            lines.append(
                f"{head} | {side['tokens_per_second']:,.0f} | {side['model_tflops']:.3g} | "
                f"{side['mfu_measured_peak']:.0%} | "
                f"{'' if mfu_published is None else f'{mfu_published:.0%}'} | "
                f"{side['compile_seconds']:.1f} | "
                f"{'' if memory is None else f'{memory:.1f}'} |")
        if run["ratio_vs_torch_compile"] is not None:
            lines.append(f"| {run['config']} | {run['batch_size']} | flax-lm / torch compile | "
                         f"{run['ratio_vs_torch_compile']:.2f}× | | | | | |")
    lines += ["", f"Loss check (relative to PyTorch; tolerance first {LOSS_TOLERANCE['first']:.0%}"
              f", last {LOSS_TOLERANCE['last']:.0%}):"]
    for run in results["runs"]:
        for label, check in run.get("loss_check", {}).items():
            first, last = check["first"], check["last"]
            lines.append(
                f"- {run['config']} b{run['batch_size']} vs {label}: step 1 {first['flax-lm']:.4f}"
                f" / {first['torch']:.4f}, step {check['steps']} {last['flax-lm']:.4f} / "
                f"{last['torch']:.4f}: {'ok' if check['ok'] else 'DIFFERS'}")
    lines += ["", f"FLOPs: {perf.FLOPS_FORMULA}.", f"Reproduce: `{results['command']}`"]
    return "\n".join(lines)


def save(results: dict, args: argparse.Namespace) -> Path:
    out = Path(args.out or BENCH / "results" / f"{device_slug(results['device_kind'])}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results["markdown"] = markdown(results)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"comma-separated, from: {', '.join(ACCEL_CONFIGS)}")
    parser.add_argument("--batch_size", type=int, help="one batch size (default: per config)")
    parser.add_argument("--first_batch_only", action="store_true",
                        help="each config at its first batch size only (gpt2-124m 32)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="flax-lm's compute dtype (torch: bfloat16 autocast)")
    parser.add_argument("--attn_implementation", default="auto",
                        choices=("auto", "reference", "xla", "cudnn"))
    parser.add_argument("--dropout", type=float, default=0.0, help="every dropout probability")
    parser.add_argument("--layers", default="auto", choices=("auto", "scanned", "unrolled"),
                        help="flax-lm's layers scanned or unrolled (auto: the platform's choice)")
    parser.add_argument("--torch_modes", default="eager,compile",
                        help="eager, compile, both, or none (flax-lm alone)")
    parser.add_argument("--peak_sizes", default="4096,8192", help="matrix sizes for the peak")
    parser.add_argument("--out", help="results JSON (default: bench/results/<device>.json)")
    parser.add_argument("--workdir", help="keep specs and logs here")
    parser.add_argument("--expect_platform", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in ACCEL_CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; choose from {', '.join(ACCEL_CONFIGS)}")
    if not set(torch_modes(args)) <= {"eager", "compile"}:
        parser.error(f"--torch_modes {args.torch_modes!r}: use eager, compile, eager,compile "
                     f"or none")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def torch_modes(args: argparse.Namespace) -> list[str]:
    return [] if args.torch_modes == "none" else args.torch_modes.split(",")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flax_lm_accel_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = run(args, work)
    out = save(results, args)
    print(results["markdown"])
    print(f"\nresults: {out}")
    failed = [label for r in results["runs"] for label, side in r["sides"].items()
              if "error" in side]
    differs = [f"{r['config']} b{r['batch_size']} vs {label}" for r in results["runs"]
               for label, check in r.get("loss_check", {}).items() if not check["ok"]]
    if differs:
        print(f"error: flax-lm's loss differs from PyTorch's beyond the tolerance: "
              f"{', '.join(differs)}", file=sys.stderr)
    return 1 if failed or differs else 0


def measure_main(kind: str, spec_path: str, out: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = measure_ours(spec) if kind == "ours" else measure_torch(spec)
    if not all(math.isfinite(result[k]) for k in ("first_loss", "last_loss")):
        print(f"non-finite loss: {result}", file=sys.stderr)
        return 1
    Path(out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == MEASURE:
        sys.exit(measure_main(*sys.argv[2:5]))
    sys.exit(main())
