"""Will a run's train step fit in device memory? Asked of XLA, without running it (the library of
`flax-lm plan`, flax_lm.commands.plan, and of --remat auto).

It takes the training flags, builds the train step the training command would
build (flax_lm.train.build: same model, dtype, remat, optimizer, mesh, accumulation and batch)
and compiles it ahead of time from shapes alone: no weights are made and the corpus is not read.
XLA then says how many bytes each device needs: parameters and optimizer state (from their
shard shapes), the batch, the program and its temporaries, against the device's memory.

--topology NAME compiles for devices this machine need not have: TPUs by any name libtpu knows
(v3-8, v4:2x2x1, v5e:4x4, ...; needs `pip install -e '.[tpu]'`), with XLA's TPU compiler,
against the HBM Google publishes for the generation (TPU_HBM_PER_CHIP); or NVIDIA GPUs of
GPU_TARGETS (h100, h200, a100; `h100:8` for eight in one host; needs JAX's CUDA plugin, no GPU),
with XLA's GPU compiler told the chip's data sheet and the installed cuDNN, against the share of
its memory JAX takes (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set). Without it the plan is
for the local devices: a GPU's memory limit, or for CPU devices the host memory available now,
which they share. The schedule's length is the one thing the flags cannot give without the
corpus; it changes constants, not memory.

On a miss it compiles a few variants (at most four) and says what fits: rematerialisation, or a
smaller per-device batch with more accumulation for the same global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from flax_lm.errors import UserError, one_line
from flax_lm.train.args import (
    AUTO,
    TrainConfig,
)

GIB = 2**30
# libtpu reads these to find the TPU host it runs on; a plan only compiles, so it is told that it
# has none to look for (and needs no lock on TPU chips that a training run may be using).
COMPILE_ONLY_TPU_ENV = {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_ACCELERATOR_TYPE": "v3-8",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
}
# HBM per chip, as Google's Cloud TPU system-architecture pages publish it, by JAX's device_kind.
# JAX makes a device of each TensorCore (v2, v3, TPU7x) or of the whole chip (megacore: v4 and
# v5p, as on their hosts, and single-core chips): tpu_hbm_bytes divides.
TPU_HBM_PER_CHIP = {
    "TPU v2": 16 * GIB,
    "TPU v3": 32 * GIB,
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 95 * GIB,  # v5p
    "TPU v6 lite": 32 * GIB,  # v6e (Trillium)
    "TPU7x": 192 * GIB,  # Ironwood
}
MAX_FALLBACK_COMPILES = 4


# ------------------------------------------------------------------------------------ devices


@dataclass
class Target:
    """The devices a plan compiles for and the memory each one has."""

    name: str  # the topology, or "local"
    devices: list
    memory_bytes: int | None  # per device
    memory_kind: str  # what memory_bytes is

    @property
    def description(self) -> str:
        kind = self.devices[0].device_kind
        return f"{self.name}: {len(self.devices)} x {kind}"


def tpu_topology(name: str) -> Target:
    """The devices of TPU topology `name` (compile-only) and their HBM (None for a generation
    TPU_HBM_PER_CHIP does not list). UserError when libtpu is missing or does not know the name."""
    import jax

    # The plan runs nothing here: leave a local TPU to training. (A process where a backend
    # runs already, a test say, keeps its platforms.)
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_platforms", "cpu")
    from jax.experimental import topologies

    # A TPU v4 runs as one device per chip (megacore), as jax.make_mesh requires; libtpu's
    # compile-only topology lists its two cores apart unless told.
    options = {"chip_config_name": "megacore"} if name.startswith("v4") else {}
    try:
        with environment(COMPILE_ONLY_TPU_ENV):
            devices = topologies.get_topology_desc(name, "tpu", **options).devices
    except RuntimeError as err:  # JaxRuntimeError is one too
        text = one_line(err, None)
        if "not installed" in text:
            raise UserError(
                f"--topology {name} needs libtpu, the one matching this jax: pip install "
                f"\"jax[tpu]=={jax.__version__}\", then plan again"
            ) from None
        raise UserError(
            f"--topology {name!r} is not a TPU topology libtpu knows (e.g. v3-8, v4:2x2x1, "
            f"v5e:4x4): {text[:200]}"
        ) from None
    return Target(name, list(devices), tpu_hbm_bytes(devices), "HBM")


def tpu_hbm_bytes(devices: list) -> int | None:
    """HBM per device of TPU `devices`: the published HBM of a chip, shared by the devices JAX
    makes of it (one per TensorCore, or one for the chip)."""
    per_chip = TPU_HBM_PER_CHIP.get(devices[0].device_kind)
    if per_chip is None:
        return None
    return per_chip // len({getattr(device, "core_on_chip", 0) for device in devices})


@dataclass(frozen=True)
class GpuSpec:
    """What XLA's GPU compiler needs to know of a chip it compiles for without one (from the
    vendor's data sheet and what CUDA reports of it)."""

    name: str  # as CUDA names the device
    compute_capability: tuple[int, int]
    multiprocessors: int
    fp32_units_per_multiprocessor: int
    clock_ghz: float
    memory_bytes: int
    memory_bandwidth: float  # bytes/s
    l2_cache_bytes: int
    shared_memory_per_multiprocessor: int
    shared_memory_per_block_optin: int
    bf16_dense_flops: float  # published, FLOP/s

    def target_config(self, cudnn: tuple[int, int] | None = None) -> str:
        """The GpuTargetConfigProto (text format) XLA compiles for, with the cuDNN version the
        GPU would run (XLA chooses cuDNN's kernels, fused attention among them, by it)."""
        major, minor = self.compute_capability
        dnn = "" if cudnn is None else "dnn_version_info {{ major: {} minor: {} }}\n".format(*cudnn)
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 threads_per_core_limit: 2048
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_multiprocessor}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  core_count: {self.multiprocessors} fpus_per_core: {self.fp32_units_per_multiprocessor}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(self.memory_bandwidth)} l2_cache_size: {self.l2_cache_bytes}
  clock_rate_ghz: {self.clock_ghz} device_memory_size: {self.memory_bytes}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
{dnn}device_description_str: "{self.name}"
"""


GPU_TARGETS = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 1.98, 84_942_979_072, 3.35e12,
                    50 * 2**20, 233_472, 232_448, 989e12),
    "h200": GpuSpec("NVIDIA H200", (9, 0), 132, 128, 1.98, 150_754_820_096, 4.8e12, 50 * 2**20,
                    233_472, 232_448, 989e12),
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 1.41, 85_097_971_712, 2.039e12,
                    40 * 2**20, 167_936, 166_912, 312e12),
}  # fmt: skip
GPU_MEMORY_FRACTION = 0.75  # what JAX takes of a GPU's memory unless told otherwise
CUDNN_DISTRIBUTIONS = ("nvidia-cudnn-cu13", "nvidia-cudnn-cu12")  # as jax[cuda13/12] installs it


def installed_cudnn() -> tuple[int, int] | None:
    """(major, minor) of the cuDNN that JAX's CUDA plugin loads, from its wheel's metadata; None
    where no cuDNN wheel is installed (XLA then assumes no cuDNN)."""
    for name in CUDNN_DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        major, minor = (version.split(".") + ["0"])[:2]
        if major.isdigit() and minor.isdigit():
            return int(major), int(minor)
    return None


def gpu_target(name: str) -> tuple[GpuSpec, int] | None:
    """(spec, GPUs) of a --topology naming GPU_TARGETS ("h100", "h100:8"); None otherwise."""
    model, _, count = name.lower().partition(":")
    if model not in GPU_TARGETS:
        return None
    if count and not (count.isdigit() and int(count) > 0):
        raise UserError(f"--topology {name!r}: the GPU count after ':' must be a positive "
                        f"whole number (e.g. {model}:8)")
    return GPU_TARGETS[model], int(count or 1)


def gpu_topology(name: str) -> Target:
    """`count` NVIDIA GPUs of one host (compile-only), for XLA's GPU compiler on any machine with
    JAX's CUDA plugin. UserError when the plugin is missing."""
    import jax

    spec, count = gpu_target(name)
    # Nothing runs here: JAX stays on the CPU, which also spares the plugin its check of a GPU.
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_platforms", "cpu")
    from jax.experimental import topologies

    try:
        config = spec.target_config(installed_cudnn())
        devices = topologies.get_topology_desc(
            platform="cuda", topology=f"1x1x{count}", target_config=config
        ).devices
    except (NotImplementedError, RuntimeError) as err:
        raise UserError(
            f"--topology {name} needs JAX's CUDA plugin (no GPU needed): pip install "
            f"\"jax[cuda12]=={jax.__version__}\", then plan again ({one_line(err, None)[:120]})"
        ) from None
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))
    return Target(name, list(devices), int(spec.memory_bytes * fraction),
                  f"device memory JAX takes ({fraction:.0%})")


def topology_target(name: str) -> Target:
    """--topology: NVIDIA GPUs of GPU_TARGETS, or a TPU topology."""
    return gpu_topology(name) if gpu_target(name) else tpu_topology(name)


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """`values` added to os.environ (where unset) while the block runs."""
    added = {key: value for key, value in values.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def local_target() -> Target:
    """The local devices; a GPU's memory limit, or for CPUs the available host memory shared
    among them."""
    import jax

    devices = jax.devices()
    stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return Target("local", devices, int(stats["bytes_limit"]), "device memory")
    available = available_host_memory()
    share = None if available is None else available // len(devices)
    return Target("local", devices, share, f"host memory available now / {len(devices)} devices")


def available_host_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """The memory of one compiled (or refused) train step, per device."""

    settings: dict[str, Any]
    per_device_bytes: dict[str, int]
    fits: bool | None
    compiled: bool  # False: XLA refused it for memory (per_device_bytes: what it holds, no more)
    compile_seconds: float
    flops: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.per_device_bytes["total"]


def shard_bytes(tree) -> int:
    """Bytes one device holds of a pytree of shapes with shardings (the largest shard)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def plan_step(cfg: TrainConfig, objective_name: str, target: Target, *,
              with_flops: bool = True) -> Plan:
    """Compile the train step of `cfg` for `target`'s devices and measure it (`with_flops`:
    also trace its FLOPs, which the variants tried for a suggestion do not need)."""
    from flax_lm.models import training_attention
    from flax_lm.train.step import compile_train_step

    p, mesh, train_step, state, batch = step_to_compile(cfg, objective_name, target)
    settings = {
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "global_batch_size": p.global_batch_size,
        "seq_len": p.seq_len,
        "dtype": cfg.dtype,
        "attention": training_attention(p.model_config, p.cfg.attn_implementation),
        "remat": cfg.remat,
        "mesh": dict(mesh.shape),
    }
    flops = step_flops(p, mesh, train_step, state, batch) if with_flops else {}
    held = {
        "parameters": shard_bytes(state.params),
        "optimizer_state": shard_bytes(state.opt_state),
        "batch": shard_bytes(batch),
    }
    print(f"compiling the train step for {target.description} ...", file=sys.stderr)
    try:
        compiled, seconds = compile_train_step(train_step, state, batch, mesh)
    except Exception as err:  # noqa: BLE001 - XLA's error types differ between versions
        if not refused_for_memory(err):
            raise
        # XLA says no more than that it does not fit: what is known is what the step holds
        per_device = {**held, "total": shard_bytes(state) + held["batch"]}
        return Plan(settings, per_device, False, False, 0.0, flops)
    memory = compiled.memory_analysis()
    per_device = {
        **held,
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "aliased": memory.alias_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "program": memory.generated_code_size_in_bytes,
    }
    per_device["total"] = (
        per_device["arguments"] + per_device["outputs"] - per_device["aliased"]
        + per_device["temporaries"] + per_device["program"]
    )  # fmt: skip
    fits = None if target.memory_bytes is None else per_device["total"] <= target.memory_bytes
    return Plan(settings, per_device, fits, True, round(seconds, 2), flops)


def refused_for_memory(err: Exception) -> bool:
    """Whether XLA refused a compile because the program does not fit the device's memory (the
    TPU compiler checks its HBM), by the error's status code."""
    return getattr(err, "error_code_string", None) == "RESOURCE_EXHAUSTED"


def step_to_compile(cfg: TrainConfig, objective_name: str, target: Target):
    """(prepared run, mesh, train step, state shapes, batch shapes) of `cfg` on `target`'s
    devices: what `compile_train_step` compiles, as the training command would."""
    from flax_lm.train.build import abstract_step, settle_attention
    from flax_lm.train.prepare import prepare_model
    from flax_lm.train.step import make_mesh

    mesh = make_mesh(target.devices, spec=cfg.mesh)
    p = prepare_model(cfg, objective_name, num_devices=mesh.size)
    p, _ = settle_attention(p, mesh, try_kernel=False)
    return (p, mesh, *abstract_step(p, mesh))


def step_flops(p, mesh, train_step, state, batch) -> dict[str, float]:
    """Per step, all devices: the model FLOPs (flax_lm.perf), the matmul FLOPs of the step as
    built (remat's recomputation included) and, with remat, of the same step without it."""
    from flax_lm.perf import model_flops_per_token, traced_matmul_flops
    from flax_lm.train.build import abstract_step

    tokens = p.global_batch_size * p.seq_len
    flops = {
        "model": model_flops_per_token(p.model_config, p.seq_len) * tokens,
        "matmul": traced_matmul_flops(train_step, state, batch),
    }
    if p.cfg.remat is not None:
        plain = dataclasses.replace(p, cfg=dataclasses.replace(p.cfg, remat=None))
        flops["matmul_without_remat"] = traced_matmul_flops(*abstract_step(plain, mesh))
    return flops


# --------------------------------------------------------------------------- what would fit


def suggest(cfg: TrainConfig, objective: str, target: Target, missed: Plan) -> list[dict]:
    """Settings that fit where `cfg` does not, each verified by a compile (at most
    MAX_FALLBACK_COMPILES): full rematerialisation at the same batch, then the largest
    per-device batch that fits with accumulation keeping the global batch."""
    found = []
    if cfg.remat != "full":
        plan = plan_step(dataclasses.replace(cfg, remat="full"), objective, target,
                         with_flops=False)
        if plan.fits:
            found.append({"flags": {"remat": "full"}, "plan": plan})
    batch, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    if batch == 1:
        return found
    half = dataclasses.replace(
        cfg, per_device_train_batch_size=batch // 2, gradient_accumulation_steps=accumulation
    )
    smaller = plan_step(half, objective, target, with_flops=False)
    estimate = batch // 2
    if missed.compiled and smaller.compiled:  # the bytes of a row, from the two batches' totals
        per_row = (missed.total - smaller.total) / (batch - batch // 2)
        fixed = missed.total - per_row * batch
        if per_row > 0:
            estimate = int((target.memory_bytes - fixed) // per_row)
    sizes = [b for b in range(min(estimate, batch - 1), 0, -1) if batch % b == 0]
    for size in sizes[: MAX_FALLBACK_COMPILES - 2]:
        flags = {
            "per_device_train_batch_size": size,
            "gradient_accumulation_steps": accumulation * (batch // size),
        }
        plan = plan_step(dataclasses.replace(cfg, **flags), objective, target, with_flops=False)
        if plan.fits:
            found.append({"flags": flags, "plan": plan})
            break
    return found


# ------------------------------------------------------------------------------- --remat auto

AUTO_REMAT_ORDER = (None, "dots", "full")  # from the least recomputation to the least memory
AUTO_REMAT_SPARE = 0.10  # of the device's memory, left for what the compiler does not count


def choose_remat(cfg: TrainConfig, objective: str, target: Target) -> tuple[TrainConfig, str]:
    """`cfg` with --remat auto resolved for `target`'s devices, and the line saying the choice.

    CPUs compute in host memory, which the plan cannot hold a run to: no remat, nothing
    compiled, nothing said. On TPUs and GPUs each policy of AUTO_REMAT_ORDER is compiled in turn
    until one leaves AUTO_REMAT_SPARE of the device memory spare; when none does, full remat,
    and the run's own compile says what would fit (see `does_not_fit`)."""
    from flax_lm.backend import device_platform

    if cfg.remat != AUTO:
        return cfg, ""
    if device_platform(target.devices[0]) == "cpu" or target.memory_bytes is None:
        return dataclasses.replace(cfg, remat=None), ""
    tried = []
    for remat in AUTO_REMAT_ORDER:
        candidate = dataclasses.replace(cfg, remat=remat)
        plan = plan_step(candidate, objective, target, with_flops=False)
        tried.append(f"{remat or 'none'} {gib(plan.total)}")
        if plan.compiled and plan.total <= (1 - AUTO_REMAT_SPARE) * target.memory_bytes:
            break
    else:
        candidate = dataclasses.replace(cfg, remat="full")
    return candidate, (
        f"remat auto: {candidate.remat or 'none'} (train step per device: {', '.join(tried)} "
        f"of {gib(target.memory_bytes)} {target.memory_kind}; --remat sets it)"
    )


def does_not_fit(cfg: TrainConfig, objective: str, err: Exception) -> UserError | None:
    """The one-line error for a run whose train step XLA refused for memory at its first
    compile (`err`), naming what would fit on the local devices; None for any other error."""
    if not refused_for_memory(err):
        return None
    target = local_target()
    missed = Plan({}, {"total": 0}, False, False, 0.0)  # XLA's refusal says no more than that
    found = suggest(cfg, objective, target, missed)
    fits = "; ".join(
        f"{' '.join(f'--{k} {v}' for k, v in item['flags'].items())} fits "
        f"({gib(item['plan'].total)})" for item in found
    ) or "nothing tried fits: a smaller model, sequence length or more devices"
    memory = "" if target.memory_bytes is None else f" ({gib(target.memory_bytes)} a device)"
    return UserError(
        f"the train step does not fit in device memory{memory}; {fits} (flax-lm plan with "
        "the same flags says more)"
    )


# ------------------------------------------------------------------------------------ output


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"

