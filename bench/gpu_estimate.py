#!/usr/bin/env python3
"""A GPU train step's time estimated from its compiled program, on a machine without the GPU.

    pip install -e '.[cuda]'          # JAX's CUDA plugin: XLA's GPU compiler, no GPU needed
    python bench/gpu_estimate.py --gpu h200 [--configs gpt2-124m,roberta-base]
                                 [--layers scanned,unrolled] [--out FILE]

For each bench/accel.py config (its shapes, batch sizes and vocabulary, bfloat16, no dropout) and
layer loop, the train step the training command would run is compiled for the GPU (`flax-lm plan
--topology` machinery: flax_lm.plan.GPU_TARGETS). XLA's optimized program is then read kernel by
kernel, loops multiplied by their trip counts, and each kernel launch is charged

    max(bytes it reads and writes / (bandwidth x bandwidth share),
        matmul FLOPs / (published bf16 peak x matmul share),
        attention FLOPs / (published bf16 peak x attention share),
        the least time a launch takes)

where a fusion reads only the slices it takes of a larger operand and a dynamic-update-slice
writes only its update; matmul FLOPs count XLA's own dots and cuBLAS calls (their dot dimensions
are in their backend config), attention FLOPs cuDNN's fused attention. The shares and the launch
time are not one fitted factor but three sets, RANGES: "low" (time) with the shares an H200
reached in bench/peak.py and a short launch, "high" with lower shares and a longer launch, and
"central" between; the estimate is the range, not a point. It ranks variants of one step better
than it predicts a new one. Writes a JSON with every run's range, its memory (XLA's temporaries)
and its heaviest kernels.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent

@dataclass(frozen=True)
class Rates:
    """What share of its published peaks a GPU reaches, and the least time of one launch."""

    bandwidth: float  # of the memory bandwidth
    matmul: float  # of the dense bf16 peak, in matmuls (XLA's and cuBLAS's)
    attention: float  # ... in cuDNN's fused attention (head width 64: far from its peak)
    launch_seconds: float  # a kernel's least time: launch, ramp-up and tail of a tiny kernel


# matmul "low": bench/peak.py's 735 of 989 TFLOP/s on an H200; attention: cuDNN's flash kernels
# at head width 64 run well below large-width rates; a launch: XLA's command buffers cut the
# launch itself, not a kernel's ramp-up and drain.
RANGES = {
    "low": Rates(bandwidth=0.90, matmul=735 / 989, attention=0.45, launch_seconds=1.5e-6),
    "central": Rates(bandwidth=0.80, matmul=0.68, attention=0.35, launch_seconds=2.5e-6),
    "high": Rates(bandwidth=0.70, matmul=0.60, attention=0.25, launch_seconds=4e-6),
}
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
ARRAY = re.compile(r"\b(pred|bf16|[fsu]\d+)\[([\d,]*)\]")
COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}", re.S | re.M)
INSTRUCTION = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)(.*)$")
BOOKKEEPING = {"get-tuple-element", "tuple", "parameter", "constant", "bitcast", "after-all",
               "partition-id", "replica-id"}  # no kernel of their own
SLICING = {"dynamic-slice", "gather", "slice"}
# Operations a fusion computes element by element: one of them feeding only slices reads only
# the sliced elements of its operand.
ELEMENTWISE = {"bitcast", "reshape", "broadcast", "select", "convert", "compare", "add",
               "subtract", "multiply", "divide", "maximum", "minimum", "negate", "exponential",
               "transpose", "copy", "and", "or", "not"}


def array_bytes(shape: str) -> int:
    """Bytes of an HLO shape (a tuple: all its arrays)."""
    return sum(DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in ARRAY.findall(shape))


def dimensions(shape: str) -> list[int]:
    found = ARRAY.search(shape)
    return [int(d) for d in found.group(2).split(",") if d] if found else []


@dataclass(frozen=True)
class Instruction:
    name: str
    shape: str
    op: str
    arguments: str  # as written between the parentheses
    operands: list[str]
    attributes: str
    root: bool


@dataclass
class Kernel:
    """One kernel of the step, with how often it runs and what one run moves and computes."""

    name: str
    op: str
    shape: str
    runs: int
    bytes: int
    flops: float  # matmul FLOPs (XLA's dots, cuBLAS calls)
    where: str  # the op_name metadata: which part of the model made it
    attention_flops: float = 0.0  # in a fused attention kernel (cuDNN's)

    def seconds(self, bandwidth: float, peak: float, rates: Rates) -> float:
        """All its runs at `rates` of the GPU's `bandwidth` and bf16 `peak`."""
        return self.runs * max(self.bytes / (bandwidth * rates.bandwidth),
                               self.flops / (peak * rates.matmul),
                               self.attention_flops / (peak * rates.attention),
                               rates.launch_seconds)


def parse(hlo: str) -> tuple[dict[str, list[Instruction]], str]:
    """The computations of an optimized HLO module, by name, and the entry computation's name."""
    computations, entry = {}, None
    for found in COMPUTATION.finditer(hlo):
        body = []
        for line in found.group(3).splitlines():
            match = INSTRUCTION.match(line)
            if match:
                operands = [a.strip().lstrip("%") for a in match.group(5).split(",")
                            if a.strip().startswith("%")]
                body.append(Instruction(match.group(2), match.group(3), match.group(4),
                                        match.group(5), operands, match.group(6),
                                        match.group(1) is not None))
        computations[found.group(2)] = body
        if found.group(1):
            entry = found.group(2)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def dot_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    """2 x output elements x contracted elements of a dot."""
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attributes)
    lhs = dimensions(shapes.get(instruction.operands[0], "")) if instruction.operands else []
    contracted = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) \
        if contracting and lhs else 1
    return 2.0 * math.prod(dimensions(instruction.shape)) * contracted


def gemm_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    """A cuBLAS call (XLA's "__cublas$gemm", "__cublas$lt$matmul"): 2 x output elements x
    contracted elements, from the dot dimensions in its backend config. Its output is a tuple
    (the product, a workspace): the product is the first array."""
    contracting = re.search(r'"lhs_contracting_dimensions":\s*\[([^\]]*)\]',
                            instruction.attributes)
    lhs = dimensions(shapes.get(instruction.operands[0], "")) if instruction.operands else []
    if not contracting or not lhs:
        return 0.0
    contracted = math.prod(lhs[int(i)] for i in re.findall(r"\d+", contracting.group(1)))
    return 2.0 * math.prod(dimensions(instruction.shape)) * contracted


def attention_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    """A fused attention kernel (cuDNN's): 4 x batch x heads x queries x keys x head width (its
    score matrix's shape, from its backend config), halved when causal, 2.5 times that for the
    backward pass."""
    scores = re.search(r'"intermediate_tensor_shape":\s*\{[^}]*?"dimensions":\s*\[([^\]]*)\]',
                       instruction.attributes)
    query = dimensions(shapes.get(instruction.operands[0], "")) if instruction.operands else []
    if not scores or not query:
        return 0.0
    score_elements = math.prod(int(d) for d in re.findall(r"\d+", scores.group(1)))
    causal = 0.5 if "causal" in instruction.attributes.lower() else 1.0
    backward = 2.5 if "Backward" in instruction.attributes else 1.0
    return 4.0 * score_elements * query[-1] * causal * backward


class Program:
    """An optimized XLA module as the kernels it launches (see the module docstring)."""

    def __init__(self, hlo: str):
        self.computations, self.entry = parse(hlo)
        self.kernels: list[Kernel] = []
        self._walk(self.entry, 1)

    def _walk(self, computation: str, runs: int) -> None:
        body = self.computations[computation]
        shapes = {i.name: i.shape for i in body}
        for instruction in body:
            attributes = instruction.attributes
            if instruction.op in BOOKKEEPING:
                continue
            if instruction.op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', attributes)
                body_name = re.search(r"body=%?([\w.\-]+)", attributes).group(1)
                self._walk(body_name, runs * (int(trips.group(1)) if trips else 1))
                continue
            if instruction.op == "conditional":  # lax.cond's true branch: the common path here
                branches = re.search(r"branch_computations=\{(.*?)\}", attributes)
                names = re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else []
                taken = re.search(r"true_computation=%?([\w.\-]+)", attributes)
                self._walk(taken.group(1) if taken else names[-1], runs)
                continue
            if instruction.op == "call":
                self._walk(re.search(r"to_apply=%?([\w.\-]+)", attributes).group(1), runs)
                continue
            self.kernels.append(self._kernel(instruction, shapes, runs))

    def _kernel(self, instruction: Instruction, shapes: dict[str, str], runs: int) -> Kernel:
        operand_bytes = [array_bytes(shapes.get(o, "")) for o in instruction.operands]
        moved, flops = array_bytes(instruction.shape) + sum(operand_bytes), 0.0
        called = re.search(r"calls=%?([\w.\-]+)", instruction.attributes)
        name = instruction.name
        if instruction.op == "fusion" and called:
            moved = self._fusion_bytes(called.group(1), operand_bytes, instruction.shape)
            flops = self._fusion_flops(called.group(1))
        elif instruction.op == "dot":
            flops = dot_flops(instruction, shapes)
        attention = 0.0
        if instruction.op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', instruction.attributes)
            name += f" <{target.group(1) if target else '?'}>"
            if target and "fmha" in target.group(1):
                attention = attention_flops(instruction, shapes)
            elif target and "cublas" in target.group(1):
                flops = gemm_flops(instruction, shapes)
        where = re.search(r'op_name="([^"]*)"', instruction.attributes)
        return Kernel(name, instruction.op, instruction.shape, runs, moved, flops,
                      where.group(1) if where else "", attention)

    def _fusion_flops(self, computation: str) -> float:
        body = self.computations[computation]
        shapes = {i.name: i.shape for i in body}
        total = 0.0
        for instruction in body:
            if instruction.op == "dot":
                total += dot_flops(instruction, shapes)
            called = re.search(r"calls=%?([\w.\-]+)", instruction.attributes)
            if instruction.op == "fusion" and called:
                total += self._fusion_flops(called.group(1))
        return total

    def _fusion_bytes(self, computation: str, operand_bytes: list[int], shape: str) -> int:
        """What a fusion moves: each parameter whole, but only the slices of one read only
        through slices (elementwise ops on the way included), nothing of one a dynamic-update-
        slice updates in place, and of its output only the updates when it is such an update."""
        body = self.computations[computation]
        shapes = {i.name: i.shape for i in body}
        users = collections.defaultdict(list)
        for instruction in body:
            for position, operand in enumerate(instruction.operands):
                users[operand].append((instruction, position))
        root = next((i.name for i in body if i.root), body[-1].name)

        def sliced_bytes(name: str, depth: int = 0) -> int | None:
            if name == root or depth > 50 or not users[name]:
                return None
            total = 0
            for user, position in users[name]:
                if user.op in SLICING and position == 0:
                    total += array_bytes(user.shape)
                elif user.op in ELEMENTWISE:
                    below = sliced_bytes(user.name, depth + 1)
                    if below is None:
                        return None
                    total += below
                else:
                    return None
            return total

        moved = 0
        for instruction in body:
            if instruction.op != "parameter":
                continue
            index = int(instruction.arguments)
            uses = users[instruction.name]
            if uses and all(u.op == "dynamic-update-slice" and p == 0 for u, p in uses):
                continue  # updated in place
            sliced = sliced_bytes(instruction.name)
            moved += sliced if sliced is not None else (
                operand_bytes[index] if index < len(operand_bytes) else 0)
        updates = [i for i in body if i.op == "dynamic-update-slice"]
        if updates:
            whole = sum(array_bytes(i.shape) for i in updates)
            written = sum(array_bytes(shapes.get(i.operands[1], "")) for i in updates)
            moved += array_bytes(shape) - whole + written
        else:
            moved += array_bytes(shape)
        return moved


# ----------------------------------------------------------------------------- the estimate


def estimate(hlo: str, bandwidth: float, bf16_peak: float, top: int = 12) -> dict:
    """The step time of an optimized HLO module on a GPU of `bandwidth` and published dense
    `bf16_peak`, at each of RANGES, with the totals and the heaviest kernels (central)."""
    kernels = Program(hlo).kernels
    central = RANGES["central"]
    heaviest = sorted(kernels, key=lambda k: -k.seconds(bandwidth, bf16_peak, central))[:top]
    return {
        "launches": sum(k.runs for k in kernels),
        "bytes": sum(k.runs * k.bytes for k in kernels),
        "matmul_flops": sum(k.runs * k.flops for k in kernels),
        "attention_flops": sum(k.runs * k.attention_flops for k in kernels),
        "step_seconds": {name: sum(k.seconds(bandwidth, bf16_peak, rates) for k in kernels)
                         for name, rates in RANGES.items()},
        "heaviest": [{"kernel": k.name, "shape": k.shape[:80], "runs": k.runs,
                      "milliseconds": 1e3 * k.seconds(bandwidth, bf16_peak, central),
                      "where": k.where[-90:]} for k in heaviest],
    }


def bench_tokenizer(work: Path) -> Path:
    from bench import train_bench_tokenizer, write_corpus

    return train_bench_tokenizer(write_corpus(work / "corpus"), work / "tokenizer")


def step_flags(name: str, batch_size: int, layers: str, tokenizer: Path) -> list[str]:
    """The training flags of an accel.py config: bfloat16, no dropout, the given layer loop."""
    from accel import ACCEL_CONFIGS, model_config

    bench, _ = ACCEL_CONFIGS[name]
    config = model_config(bench, dropout=0.0)
    dropout = ("attn_pdrop=0,resid_pdrop=0,embd_pdrop=0" if bench.objective == "clm"
               else "hidden_dropout_prob=0,attention_probs_dropout_prob=0")
    length = "--block_size" if bench.objective == "clm" else "--max_seq_length"
    return ["--model_type", config.model_type, "--tokenizer_name", str(tokenizer),
            "--config_overrides", f"vocab_size={config.vocab_size},{dropout}",
            length, str(bench.seq_len), "--per_device_train_batch_size", str(batch_size),
            "--dtype", "bfloat16", "--scan_layers" if layers == "scanned" else "--no_scan_layers"]


def run_one(gpu: str, flags: list[str]) -> dict:
    """Compile one step for `gpu` and estimate it."""
    from flax_lm import perf
    from flax_lm.commands.plan import parse_args
    from flax_lm.plan import GPU_TARGETS, gpu_topology, step_to_compile
    from flax_lm.train.step import compile_train_step

    cfg, objective, _ = parse_args(flags)
    target = gpu_topology(gpu)
    p, mesh, train_step, state, batch = step_to_compile(cfg, objective, target)
    compiled, seconds = compile_train_step(train_step, state, batch, mesh)
    spec = GPU_TARGETS[gpu]
    result = estimate(compiled.as_text(), spec.memory_bandwidth, spec.bf16_dense_flops)
    tokens = p.global_batch_size * p.seq_len
    model_flops = perf.model_flops_per_token(p.model_config, p.seq_len) * tokens
    steps = result["step_seconds"]
    return {**result, "compile_seconds": seconds, "tokens_per_step": tokens,
            "estimated_tokens_per_second": {k: tokens / v for k, v in steps.items()},
            "estimated_mfu_published_peak": {k: model_flops / v / spec.bf16_dense_flops
                                             for k, v in steps.items()},
            "temporaries_bytes": compiled.memory_analysis().temp_size_in_bytes}


def table(results: dict) -> str:
    lines = [f"Estimated on {results['gpu']} ({results['device']}), compiled on a machine without "
             "it; tokens/s low-central-high (bench/gpu_estimate.py RANGES).", "",
             "| config | batch | layers | GB moved | matmul TFLOP | kernels | temporaries GiB "
             "| compile s (no autotuning) | step ms (central) | tokens/s (range: high, central, low time) "
             "| MFU, published peak (central) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in results["runs"]:
        rate = run["estimated_tokens_per_second"]
        lines.append(
            f"| {run['config']} | {run['batch_size']} | {run['layers']} | {run['bytes'] / 1e9:.1f} "
            f"| {run['matmul_flops'] / 1e12:.2f} | {run['launches']} "
            f"| {run['temporaries_bytes'] / 2**30:.2f} | {run['compile_seconds']:.1f} "
            f"| {run['step_seconds']['central'] * 1e3:.1f} "
            f"| {rate['high']:,.0f} - {rate['central']:,.0f} - {rate['low']:,.0f} "
            f"| {run['estimated_mfu_published_peak']['central']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from accel import ACCEL_CONFIGS, DEFAULT_CONFIGS

    from flax_lm.plan import GPU_TARGETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="h200", choices=sorted(GPU_TARGETS))
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"comma-separated, from: {', '.join(ACCEL_CONFIGS)}")
    parser.add_argument("--layers", default="scanned,unrolled",
                        help="scanned, unrolled or both")
    parser.add_argument("--batch_size", type=int, help="one batch size (default: accel.py's)")
    parser.add_argument("--out", help="results JSON (default: bench/results/"
                        "gpu-estimate-<gpu>.json)")
    args = parser.parse_args(argv)
    configs, layers = args.configs.split(","), args.layers.split(",")
    if not set(configs) <= set(ACCEL_CONFIGS) or not set(layers) <= {"scanned", "unrolled"}:
        parser.error(f"--configs from {', '.join(ACCEL_CONFIGS)}; --layers scanned, unrolled")
    results = {"gpu": args.gpu, "device": GPU_TARGETS[args.gpu].name,
               "jax": __import__("jax").__version__,
               "ranges": {name: vars(rates) for name, rates in RANGES.items()},
               "command": "python " + " ".join(["bench/gpu_estimate.py", *(argv or sys.argv[1:])]),
               "runs": []}
    with tempfile.TemporaryDirectory(prefix="flax_lm_gpu_estimate_") as tmp:
        tokenizer = bench_tokenizer(Path(tmp))
        for name in configs:
            for batch_size in (args.batch_size,) if args.batch_size else ACCEL_CONFIGS[name][1]:
                for loop in layers:
                    print(f"{name}, batch {batch_size}, {loop}", file=sys.stderr, flush=True)
                    run = run_one(args.gpu, step_flags(name, batch_size, loop, tokenizer))
                    results["runs"].append({"config": name, "batch_size": batch_size,
                                            "layers": loop, **run})
    results["markdown"] = table(results)
    out = Path(args.out or BENCH / "results" / f"gpu-estimate-{args.gpu}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(results["markdown"])
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
