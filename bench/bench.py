#!/usr/bin/env python3
"""Training throughput of flax-lm against transformers' PyTorch Trainer, and MFU.

    python bench/bench.py [--configs tiny-clm,tiny-mlm,gpt2-124m,roberta-base] [--steps N]
                          [--repeats R] [--out bench/results/cpu.json]

For each config, in this order and each in its own process (so peak memory is its own):
- ours: the real training command (flax_lm.commands.train, as run_clm_flax.py / run_mlm_flax.py run
  it) with --max_steps; tokens/s (steady state) and compile seconds are the ones it reports in
  train_results.json; the input stall is the loop's own Prefetcher.wait_seconds;
- the peer: bench/peer_trainer.py, transformers' Trainer on the same model config, the very same
  batches (dumped from our data pipeline: same token ids, order and MLM masks) and optimizer.
Both train for real on the Python standard library's source, with a byte-level BPE tokenizer
trained here; final train and eval losses are shown side by side. The matmul peak that MFU is
measured against comes from bench/peak.py, run first on the same machine. With 12-layer configs,
the first-step compile time is also measured scanned vs unrolled, and again with a warm JAX
persistent compilation cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flax_lm import perf
from flax_lm.hostmem import huge_pages_env, huge_pages_set, reexec_with_huge_pages

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"

TOKENIZER_VOCAB = 8192
TRAIN_BYTES, VALIDATION_BYTES = 1_000_000, 20_000
MEASURE_OURS = "--measure-ours"  # how bench.py calls itself for our side's process


@dataclass(frozen=True)
class BenchConfig:
    """One benchmarked model: base config + overrides, shapes, steps and learning rate."""

    objective: str  # "clm" (GPT-2) | "mlm" (RoBERTa)
    overrides: str  # config overrides on the published base config ("": the full-size model)
    seq_len: int
    batch_size: int
    steps: int
    learning_rate: float
    tokenizer_vocab: bool  # the model's vocab is the tokenizer's (else the real 50257/50265)

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def full_size(self) -> bool:
        return not self.overrides

    @property
    def model_type(self) -> str:
        return {"clm": "gpt2", "mlm": "roberta"}[self.objective]


CONFIGS = {
    "micro-clm": BenchConfig("clm", "n_embd=32,n_layer=1,n_head=2", 32, 4, 4, 1e-3, True),
    "tiny-clm": BenchConfig("clm", "n_embd=128,n_layer=2,n_head=4", 256, 8, 40, 1e-3, True),
    "tiny-mlm": BenchConfig(
        "mlm",
        "hidden_size=128,intermediate_size=512,num_hidden_layers=2,num_attention_heads=4",
        128, 8, 40, 1e-3, True,
    ),
    "gpt2-124m": BenchConfig("clm", "", 512, 4, 6, 1e-4, False),
    "roberta-base": BenchConfig("mlm", "", 128, 8, 6, 1e-4, False),
}
DEFAULT_CONFIGS = "tiny-clm,tiny-mlm,gpt2-124m,roberta-base"
HYPERPARAMETERS = {  # the same on both sides
    "warmup_steps": 2,
    "weight_decay": 0.01,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "lr_scheduler_type": "linear",
    "seed": 42,
}


# ----------------------------------------------------------------------------- shared inputs


def stdlib_files() -> list[Path]:
    """The standard library's top-level modules, sorted: a fixed, real corpus on every machine."""
    import sysconfig

    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def write_corpus(root: Path) -> Path:
    """Copies of stdlib modules: ~1 MB in train/, then ~20 KB of other modules in validation/."""
    files = iter(stdlib_files())
    for split, limit in (("train", TRAIN_BYTES), ("validation", VALIDATION_BYTES)):
        (root / split).mkdir(parents=True)
        copied = 0
        while copied < limit:
            source = next(files)
            shutil.copyfile(source, root / split / source.name)
            copied += source.stat().st_size
    return root


def train_bench_tokenizer(corpus: Path, out: Path) -> Path:
    from flax_lm.tokenizer import train_tokenizer

    texts = (p.read_text(encoding="utf-8") for p in sorted((corpus / "train").iterdir()))
    return train_tokenizer(texts, TOKENIZER_VOCAB, 2, out)


def write_model_config(config: BenchConfig, tokenizer: Path, out: Path) -> Path:
    """config.json as `flax-lm create-config` makes it: the published base config, with the
    tokenizer's vocab and special-token ids for the tiny models, then the overrides."""
    from flax_lm.config import build_config

    tokenizer_dir = str(tokenizer) if config.tokenizer_vocab else None
    model_config = build_config(config.model_type, tokenizer_dir=tokenizer_dir,
                                overrides=config.overrides or None)
    model_config.save_pretrained(out)
    return out


def cli_args(config: BenchConfig, steps: int, output_dir: Path, inputs: dict[str, Path],
             extra: Sequence[str] = ()) -> list[str]:
    """Our training command line for `config` (flags of run_clm_flax.py / run_mlm_flax.py);
    flags in `extra` come last, so they win."""
    length_flag = "block_size" if config.objective == "clm" else "max_seq_length"
    flags: dict[str, object] = {
        "output_dir": output_dir,
        "config_name": inputs["model_config"],
        "tokenizer_name": inputs["tokenizer"],
        "train_file": inputs["corpus"] / "train",
        "validation_file": inputs["corpus"] / "validation",
        length_flag: config.seq_len,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "max_steps": steps,
        "logging_steps": steps,
        "save_steps": steps,
        "report_to": "none",
        "compilation_cache_dir": "none",
        **HYPERPARAMETERS,
    }
    args = [f"--{k}={v}" for k, v in flags.items()]
    return [*args, "--overwrite_output_dir", "--do_train", "--do_eval", *extra]


# ---------------------------------------------------------------------------------- our side


def measure_ours(objective: str, result_path: str, args: list[str]) -> int:
    """In its own process: the real training command, its train Prefetcher recording the stall
    (the wait for the first batch, made before compilation, is not steady state: left out).
    Like the training commands, it first re-executes itself with huge pages for host memory."""
    reexec_with_huge_pages()
    from flax_lm.commands import train as cli
    from flax_lm.train import trainer
    from flax_lm.train.data import feed

    class StallRecordingPrefetcher(trainer.Prefetcher):
        training = None

        def __init__(self, iterator, *rest, **kwargs):
            super().__init__(iterator, *rest, **kwargs)
            self.first_wait = None
            if isinstance(iterator, feed.TrainStream):
                StallRecordingPrefetcher.training = self

        def __next__(self):
            item = super().__next__()
            if self.first_wait is None:
                self.first_wait = self.wait_seconds
            return item

    trainer.Prefetcher = StallRecordingPrefetcher
    status = cli.main(args, objective=objective)
    training = StallRecordingPrefetcher.training
    result = {
        "input_wait_seconds": training.wait_seconds - training.first_wait,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "huge_pages": huge_pages_set(os.environ),
    }
    Path(result_path).write_text(json.dumps(result))
    return status


def run_process(command: list[str], log: Path) -> None:
    """Run a measured side; its output goes to `log`, shown if it fails."""
    with open(log, "w") as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if status != 0:
        sys.exit(f"{' '.join(command[:3])} ... failed ({status}):\n{log.read_text()[-3000:]}")


def run_ours(config: BenchConfig, steps: int, work: Path, inputs: dict[str, Path]) -> dict:
    output_dir = work / "ours"
    result_path = work / "ours_process.json"
    args = cli_args(config, steps, output_dir, inputs)
    command = [sys.executable, __file__, MEASURE_OURS, config.objective, str(result_path), *args]
    run_process(command, work / "ours.log")
    reported = json.loads((output_dir / "all_results.json").read_text())
    process = json.loads(result_path.read_text())
    tokens_per_second = reported["train_tokens_per_second"]
    steady_seconds = (steps - 1) * config.tokens_per_step / tokens_per_second
    return {
        "tokens_per_second": tokens_per_second,
        "step_seconds": config.tokens_per_step / tokens_per_second,
        "compile_seconds": reported["compile_seconds"],
        "input_stall": process["input_wait_seconds"] / steady_seconds,
        "peak_rss_mb": process["peak_rss_mb"],
        "huge_pages": process["huge_pages"],
        "train_loss": reported["train_loss"],
        "eval_loss": reported.get("eval_loss"),
    }


# --------------------------------------------------------------------------------- the peer


def dump_batches(config: BenchConfig, steps: int, args: list[str], path: Path) -> None:
    """The exact batches our trainer trains on (same data pipeline, order and MLM masks) and its
    evaluation examples (padding rows dropped), for the peer."""
    from flax_lm.train.args import parse_config
    from flax_lm.train.data.feed import TrainStream, eval_host_batches
    from flax_lm.train.prepare import prepare

    prepared = prepare(parse_config(args, config.objective), config.objective, num_devices=1)
    seed = prepared.cfg.seed
    stream = TrainStream(prepared.train_batches, prepared.objective, seed, 0, 1)
    train = list(itertools.islice(stream, steps))
    evaluation = list(eval_host_batches(prepared.splits["validation"], prepared.objective,
                                        config.batch_size, seed))
    real = np.concatenate([b["example_weight"] for b in evaluation]) > 0
    arrays = {}
    for key in ("input_ids", "attention_mask", "labels"):
        arrays[f"train_{key}"] = np.concatenate([b[key][0] for b in train])
        arrays[f"eval_{key}"] = np.concatenate([b[key] for b in evaluation])[real]
    np.savez(path, **arrays)


def run_peer(config: BenchConfig, steps: int, work: Path, inputs: dict[str, Path]) -> dict:
    data = work / "peer_batches.npz"
    if not data.exists():
        dump_batches(config, steps, cli_args(config, steps, work / "unused", inputs), data)
    spec = {
        "objective": config.objective,
        "model_dir": str(inputs["model_config"]),
        "data": str(data),
        "batch_size": config.batch_size,
        "eval_batch_size": config.batch_size,
        "steps": steps,
        "learning_rate": config.learning_rate,
        "logging_steps": steps,
        "threads": len(os.sched_getaffinity(0)),
        **HYPERPARAMETERS,
    }
    spec_path, result_path = work / "peer_spec.json", work / "peer_result.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    command = [sys.executable, str(BENCH / "peer_trainer.py"), str(spec_path), str(result_path)]
    run_process(command, work / "peer.log")
    return json.loads(result_path.read_text())


# --------------------------------------------------------------------------------- figures


def medians(runs: list[dict]) -> dict:
    """Per figure, the median over repeats (figures that are None in a run are left out)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and v is not None]
    return {k: statistics.median(run[k] for run in runs) for k in keys}


def with_flops(side: dict, flops_per_token: float, peaks: dict) -> dict:
    """Achieved FLOP/s and MFU against the measured f32 and bf16 matmul peaks of JAX."""
    achieved = perf.achieved_flops_per_second(side["tokens_per_second"], flops_per_token)
    mfu = {
        dtype: perf.mfu(side["tokens_per_second"], flops_per_token, peak)
        for dtype, peak in peaks["jax"].items()
    }
    return {**side, "achieved_flops_per_second": achieved, "mfu": mfu}


def model_flops(config: BenchConfig, model_dir: Path) -> tuple[float, int, int]:
    """Training FLOPs per token, matmul parameters and vocabulary size of the benchmarked model."""
    from transformers import AutoConfig

    from flax_lm.models import matmul_param_count

    model_config = AutoConfig.from_pretrained(model_dir)
    flops = perf.model_flops_per_token(model_config, config.seq_len)
    return flops, matmul_param_count(model_config), model_config.vocab_size


def bench_config(name: str, steps: int, repeats: int, work: Path, inputs: dict[str, Path],
                 peaks: dict) -> dict:
    config = CONFIGS[name]
    work.mkdir(parents=True)
    model_dir = write_model_config(config, inputs["tokenizer"], work / "model_config")
    inputs = {**inputs, "model_config": model_dir}
    ours_runs, peer_runs = [], []
    for repeat in range(repeats):
        print(f"{name}: repeat {repeat + 1}/{repeats}", flush=True)
        ours_runs.append(run_ours(config, steps, work, inputs))
        peer_runs.append(run_peer(config, steps, work, inputs))
    flops_per_token, matmul_params, vocab_size = model_flops(config, model_dir)
    ours = with_flops(medians(ours_runs), flops_per_token, peaks)
    peer = with_flops(medians(peer_runs), flops_per_token, peaks)
    return {
        "settings": {**dataclasses.asdict(config), "steps": steps, "vocab_size": vocab_size},
        "matmul_params": matmul_params,
        "flops_per_token": flops_per_token,
        "ours": ours,
        "peer": peer,
        "ours_runs": ours_runs,
        "peer_runs": peer_runs,
        "ratio": ours["tokens_per_second"] / peer["tokens_per_second"],
        "load_average": os.getloadavg(),
    }


def compile_study(name: str, work: Path, inputs: dict[str, Path]) -> dict:
    """First-step compile seconds of a 12-layer model: scanned and unrolled with no cache, then
    scanned twice with a fresh persistent compilation cache (the second run should reuse it)."""
    config, cache = CONFIGS[name], work / "jax_cache"
    inputs = {**inputs, "model_config": work.parent / "model_config"}
    runs = {
        "scan": [],
        "unrolled": ["--no_scan_layers"],
        "scan_cache_cold": [f"--compilation_cache_dir={cache}"],
        "scan_cache_warm": [f"--compilation_cache_dir={cache}"],
    }
    seconds = {}
    for label, extra in runs.items():
        print(f"{name}: compile, {label}", flush=True)
        (work / label).mkdir(parents=True)
        args = cli_args(config, 1, work / label / "out", inputs, extra)
        run_process([sys.executable, "-m", "flax_lm.commands.cli", f"run-{config.objective}", *args],
                    work / label / "log.txt")
        reported = json.loads((work / label / "out" / "train_results.json").read_text())
        seconds[label] = reported["compile_seconds"]
    return seconds


def machine() -> dict:
    import jax
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def measure_peak(work: Path, sizes: str) -> dict:
    out = work / "peak.json"
    run_process([sys.executable, str(BENCH / "peak.py"), "--sizes", sizes, "--out", str(out)],
                work / "peak.log")
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    peaks = results["peak"]
    lines = [
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; "
        f"jax {results['machine']['jax']}, torch {results['machine']['torch']}; "
        f"load average {results['load_average_start'][0]:.2f} at start, "
        f"{results['load_average_end'][0]:.2f} at end. "
        f"Measured matmul peak (JAX): float32 {peaks['jax']['float32'] / 1e9:.0f} GFLOP/s, "
        f"bfloat16 {peaks['jax']['bfloat16'] / 1e9:.0f} GFLOP/s "
        f"(torch: {peaks['torch']['float32'] / 1e9:.0f} / {peaks['torch']['bfloat16'] / 1e9:.1f}).",
        "",
        "| config | tokens/step | flax-lm tokens/s | Trainer tokens/s | ratio | step ms "
        "(flax-lm / Trainer) | GFLOP/token | MFU f32 (flax-lm / Trainer) | compile s | input stall "
        "| peak RSS MB (flax-lm / Trainer) | train loss (flax-lm / Trainer) | eval loss | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["configs"].items():
        ours, peer, s = r["ours"], r["peer"], r["settings"]
        lines.append(
            f"| {name} | {s['seq_len']}×{s['batch_size']} | {ours['tokens_per_second']:,.0f} | "
            f"{peer['tokens_per_second']:,.0f} | {r['ratio']:.2f}× | "
            f"{ours['step_seconds'] * 1e3:.0f} / {peer['step_seconds'] * 1e3:.0f} | "
            f"{r['flops_per_token'] / 1e9:.3f} | "
            f"{ours['mfu']['float32']:.0%} / {peer['mfu']['float32']:.0%} | "
            f"{ours['compile_seconds']:.1f} | {ours['input_stall']:.1%} | "
            f"{ours['peak_rss_mb']:,.0f} / {peer['peak_rss_mb']:,.0f} | "
            f"{ours['train_loss']:.3f} / {peer['train_loss']:.3f} | "
            f"{ours['eval_loss']:.3f} / {peer['eval_loss']:.3f} | {r['load_average'][0]:.1f} |"
        )
    for name, seconds in results["compile"].items():
        lines.append("")
        lines.append(
            f"{name} first-step compile: scanned {seconds['scan']:.1f} s, unrolled "
            f"{seconds['unrolled']:.1f} s; persistent cache cold {seconds['scan_cache_cold']:.1f} s"
            f" -> warm {seconds['scan_cache_warm']:.1f} s."
        )
    ours_huge = all(r["ours"].get("huge_pages") for r in results["configs"].values())
    lines += ["", "Host memory in huge pages (glibc.malloc.hugetlb=1, see flax_lm/hostmem.py): "
              f"flax-lm {'yes' if ours_huge else 'no'}, "
              f"Trainer {'yes' if results.get('peer_huge_pages') else 'no'}."]
    lines += ["", f"FLOPs: {perf.FLOPS_FORMULA}.",
              f"Medians of {results['repeats']} runs. Reproduce: `{results['command']}`"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu", "tpu"),
                        help="gpu/tpu: bench/accel.py (flax-lm's step vs PyTorch bf16, eager and "
                             "torch.compile); the other options are then accel.py's")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"comma-separated, from: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, help="training steps per run (default: per config)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (medians kept)")
    parser.add_argument("--out", default="bench/results/cpu.json", help="results JSON")
    parser.add_argument("--peak_sizes", default="1024,2048", help="matrix sizes for the peak")
    parser.add_argument("--no_compile_study", action="store_true",
                        help="skip the scan/unrolled/cache compile runs of 12-layer configs")
    parser.add_argument("--workdir", help="keep runs here (default: a temporary directory)")
    parser.add_argument("--peer_huge_pages", action="store_true",
                        help="give the Trainer the huge-page tunable our commands set themselves "
                             "(flax_lm/hostmem.py); by default it runs as users run it")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    if args.steps is not None and args.steps < 3:
        parser.error("--steps must be at least 3 (the first step is not steady state)")
    return args


def accelerator(argv: list[str]) -> tuple[str, list[str]]:
    """(--device's value, the other arguments): gpu and tpu runs go to bench/accel.py."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu", "tpu"))
    known, rest = parser.parse_known_args(argv)
    return known.device, rest


def save(results: dict, out: Path) -> None:
    """Write the results so far (a long run that is interrupted keeps what it measured)."""
    results["load_average_end"] = os.getloadavg()
    results["markdown"] = markdown(results)
    out.write_text(json.dumps(results, indent=2) + "\n")


def run_benchmark(args: argparse.Namespace, work: Path, out: Path) -> dict:
    names = args.configs.split(",")
    inputs = {"corpus": write_corpus(work / "corpus")}
    inputs["tokenizer"] = train_bench_tokenizer(inputs["corpus"], work / "tokenizer")
    results = {
        "machine": machine(),
        "command": "python bench/bench.py " + " ".join(sys.argv[1:]),
        "load_average_start": os.getloadavg(),
        "repeats": args.repeats,
        "flops_formula": perf.FLOPS_FORMULA,
        "tokenizer_vocab": TOKENIZER_VOCAB,
        "peak": measure_peak(work, args.peak_sizes),
        "peer_huge_pages": huge_pages_set(os.environ),
        "configs": {},
        "compile": {},
    }
    for name in names:
        steps = args.steps or CONFIGS[name].steps
        results["configs"][name] = bench_config(
            name, steps, args.repeats, work / name, inputs, results["peak"]
        )
        save(results, out)
    if not args.no_compile_study:
        for name in filter(lambda n: CONFIGS[n].full_size, names):
            results["compile"][name] = compile_study(name, work / name / "compile", inputs)
            save(results, out)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    device, rest = accelerator(argv)
    if device != "cpu":
        import accel

        return accel.main([*rest, "--expect_platform", device])
    args = parse_args(argv)
    if args.peer_huge_pages:  # both sides inherit it; our side's re-execution is then a no-op
        os.environ.update(huge_pages_env(dict(os.environ)) or {})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flax_lm_bench_") as tmp:
        results = run_benchmark(args, Path(args.workdir or tmp), out)
    print(results["markdown"])
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == MEASURE_OURS:
        sys.exit(measure_ours(sys.argv[2], sys.argv[3], sys.argv[4:]))
    sys.exit(main())
