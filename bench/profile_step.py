#!/usr/bin/env python3
"""Where a train step's time goes: one step of a bench config traced with jax.profiler.

    python bench/profile_step.py [--config gpt2-124m] [--top 25] [--trace_dir DIR]

Builds the step exactly as the trainer does (model, objective, AdamW with clipping and the
finite-update guard, compiled once with the state donated; host memory in huge pages, as the
training commands set it: FLAX_LM_HUGE_PAGES=0 to profile without), runs two steps to warm up,
traces a third, and prints its XLA operations by total time: each with its output shape and the JAX
operation it came from, and whether it is a matrix multiplication (an HLO fusion holding a dot).
The summary splits the step into matmul time (with the FLOP/s it reaches) and everything else.
The trace stays in --trace_dir for TensorBoard/XProf or Perfetto.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from bench import CONFIGS, HYPERPARAMETERS, TOKENIZER_VOCAB, BenchConfig
from flax_lm import perf
from flax_lm.config import build_config
from flax_lm.hostmem import reexec_with_huge_pages
from flax_lm.models import create_model
from flax_lm.models.hf_io import save_model
from flax_lm.train import step as train_step_lib
from flax_lm.train.args import TrainConfig
from flax_lm.train.objectives import CausalLM, MaskedLM
from flax_lm.train.optim import make_schedule, make_training_optimizer

RUNTIME_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "$", "Thunk")  # not operations


LAYERS = {"auto": None, "scanned": True, "unrolled": False}  # --layers: scan_layers
PEER_BATCH = "batch.npz"  # build_step's batch and learning rates, beside the saved model


def build_step(bench: BenchConfig, *, scan_layers: bool | None = None, dtype: str = "float32",
               attention: str = "auto", dropout: float | None = None, batch_size: int | None = None,
               save_to: Path | None = None):
    """(compiled step, compile seconds, state, device batch, model config) for a bench config:
    the trainer's model, objective, AdamW with clipping and the finite-update guard, compiled once
    with the state donated, on one batch of random token ids (MLM-masked for RoBERTa).
    scan_layers None: the platform's choice, as the training commands make it. `save_to`: write
    the initial model there as PyTorch loads it (config.json, model.safetensors) and the batch
    and each step's learning rate as batch.npz, for a peer to start from the same point."""
    overrides = bench.overrides
    if bench.tokenizer_vocab:  # the bench's own tokenizer's vocabulary, without training it
        overrides += f",vocab_size={TOKENIZER_VOCAB}"
    config = build_config(bench.model_type, dropout=dropout, overrides=overrides or None)
    model = create_model(config, seed=0, scan_layers=scan_layers, dtype=dtype,
                         attention=attention)
    graphdef, params = nnx.split(model, nnx.Param)
    cfg = TrainConfig(learning_rate=bench.learning_rate, **HYPERPARAMETERS)
    schedule = make_schedule(cfg, bench.steps)
    optimizer = make_training_optimizer(cfg, schedule, params)
    if bench.objective == "clm":
        objective = CausalLM()
    else:
        objective = MaskedLM(mask_token_id=4, vocab_size=config.vocab_size,
                             special_token_ids=(0, 1, 2, 3, 4))
    rng = np.random.default_rng(0)
    shape = (batch_size or bench.batch_size, bench.seq_len)
    ids = rng.integers(5, config.vocab_size, shape, dtype=np.int32)
    host_batch = {k: v[None] for k, v in objective.make_batch({"input_ids": ids}, rng).items()}
    mesh = train_step_lib.make_mesh()
    batch = train_step_lib.make_put(mesh, batch_axis=1)(host_batch)
    state = train_step_lib.init_state(params, optimizer, 0, mesh)
    step = train_step_lib.make_train_step(graphdef, objective, optimizer, schedule)
    compiled, seconds = train_step_lib.compile_train_step(step, state, batch, mesh)
    if save_to is not None:
        save_model(model, save_to)
        rates = np.asarray([schedule(i) for i in range(bench.steps)], np.float64)
        np.savez(Path(save_to) / PEER_BATCH, learning_rates=rates,
                 **{k: v[0] for k, v in host_batch.items()})
    return compiled, seconds, state, batch, config


def matmul_ops(hlo_text: str) -> set[str]:
    """Names of the operations that multiply matrices: dots, and fusions whose body has one."""
    bodies = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.S | re.M))
    ops = set()
    for op, called in re.findall(r"%([\w.\-]+) = [^\n]*?calls=%([\w.\-]+)", hlo_text):
        if " dot(" in bodies.get(called, ""):
            ops.add(op)
    ops.update(re.findall(r"%([\w.\-]+) = \S+ dot\(", hlo_text))
    return ops


def op_descriptions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO operation name -> (output shape, the JAX operation it came from)."""
    found = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if match:
            source = re.search(r'op_name="([^"]*)"', line)
            found[match.group(1)] = (match.group(2), source.group(1) if source else "")
    return found


def traced_op_seconds(trace_dir: Path) -> dict[str, float]:
    """Total seconds of each XLA operation in the trace (all host threads)."""
    xplane = next(trace_dir.rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(xplane))
    seconds: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if not event.name.startswith(RUNTIME_EVENTS):
                    seconds[event.name] += event.duration_ns / 1e9
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="gpt2-124m", choices=sorted(CONFIGS))
    parser.add_argument("--top", type=int, default=25, help="operations listed")
    parser.add_argument("--layers", default="auto", choices=sorted(LAYERS),
                        help="scan or unroll the layers (auto: as the platform's runs do)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--attn_implementation", default="auto",
                        choices=("auto", "reference", "xla", "cudnn"))
    parser.add_argument("--batch_size", type=int, help="default: the bench config's")
    parser.add_argument("--trace_dir", help="keep the trace here (default: a temporary dir)")
    args = parser.parse_args(argv)
    if argv is None:  # as a command: profile the step as the training commands run it
        reexec_with_huge_pages()

    compiled, _, state, batch, config = build_step(
        CONFIGS[args.config], scan_layers=LAYERS[args.layers], dtype=args.dtype,
        attention=args.attn_implementation, batch_size=args.batch_size)
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    trace_dir = Path(args.trace_dir or tempfile.mkdtemp(prefix="flax-lm-trace-"))
    jax.profiler.start_trace(str(trace_dir))
    started = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_seconds = time.perf_counter() - started
    jax.profiler.stop_trace()

    hlo = compiled.as_text()
    seconds = traced_op_seconds(trace_dir)
    matmuls, described = matmul_ops(hlo), op_descriptions(hlo)
    # Control flow (cond, while, call) spans the operations it runs: counted through those.
    leaf = {op: s for op, s in seconds.items() if op in described and not
            op.startswith(("cond", "while", "call", "conditional"))}
    matmul_seconds = sum(s for op, s in leaf.items() if op in matmuls)
    other_seconds = sum(s for op, s in leaf.items() if op not in matmuls)
    bench = CONFIGS[args.config]
    tokens = bench.seq_len * (args.batch_size or bench.batch_size)
    flops = perf.model_flops_per_token(config, bench.seq_len) * tokens
    print(f"{args.config}: step {step_seconds:.2f} s, {tokens / step_seconds:,.0f} tokens/s, "
          f"{flops / step_seconds / 1e9:.1f} model GFLOP/s")
    if matmul_seconds:  # operations are found by HLO name: on a GPU, kernels may carry others
        print(f"  matmuls {matmul_seconds:.3f} s ({flops / matmul_seconds / 1e9:.1f} GFLOP/s of "
              f"model FLOPs), everything else {other_seconds:.3f} s")
    print(f"\n{'seconds':>8} {'kind':6} {'operation':34} {'output shape':34} from")
    for op, s in sorted(leaf.items(), key=lambda item: -item[1])[: args.top]:
        shape, source = described[op]
        source = source.removeprefix("jit(train_step)/")[-60:]
        kind = "matmul" if op in matmuls else ""
        print(f"{s:8.3f} {kind:6} {op[:34]:34} {shape[:34]:34} {source}")
    print(f"\ntrace: {trace_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
