"""Which platform JAX computes on, and what flax-lm does differently on each.

Model and step code never test for a platform: they take a named choice from BACKENDS, made
once where a run is set up. A choice differs between platforms only where it was measured to
pay on one; the rest is the same everywhere:

- attention: the implementation `--attn_implementation auto` picks (flax_lm/models/attention.py).
  The CPU takes "reference", which computes causal attention in query blocks against their key
  prefixes: XLA:CPU computes every score of a full matrix, masked or not, so skipping the upper
  triangle is work saved there. NVIDIA GPUs take cuDNN's fused kernel in bfloat16 (causal by
  `is_causal`); TPUs from v4 on Pallas' splash (flash) attention, in float32 and bfloat16, as
  MaxText and Levanter run it there; TPUs v2 and v3 and the rest XLA's. Where the fast kernel
  cannot compile or run, or differs from the reference, a training run says so in one line and
  takes XLA's attention (flax_lm/models/attention.py settle_attention).
- scan_layers: whether the layers run under one `lax.scan` (`--scan_layers` unset). A scan
  compiles the block once, but JAX fixes what its backward pass reads: every intermediate of
  the block, stacked per layer in memory (float32 LayerNorm terms, the GELU's parts). Unrolled,
  XLA sees the whole step and recomputes such elementwise terms inside the backward kernels that
  read them. Compiled for a GPU (bench/gpu_estimate.py), an unrolled step moves about half the
  bytes of a scanned one and holds under half its temporaries, for a longer compile
  (docs/performance.md, "On a GPU"): GPUs unroll, CPUs and TPUs (whose recipes are planned
  scanned) scan. Unrolled layers also recompute the MLP's activation in the
  backward pass (layers.recomputed_activation), where XLA would keep its inner terms.
- fused_loss: whether the cross-entropy over the vocabulary takes its hand-made, one-pass
  gradient even where a row's logits fit one chunk, and pads the vocabulary to aligned widths
  for its matmuls (flax_lm/models/output.py): everywhere but on CPUs, whose compiler fuses
  autodiff's whole-logits gradient better and pads nothing itself.
- host_huge_pages: whether the commands that run a model re-execute themselves with glibc's
  huge-page tunable (flax_lm/hostmem.py). Only the CPU computes in host memory.
- The dropout mask (flax_lm/models/layers.py keep_mask) is the same counter-based hash on every
  platform, so a run drops the same activations whatever computes it, sharded or not, in blocks
  or whole: not a choice, by design.

`platform()` asks JAX (starting its backends); `startup_platform()` says which platform JAX will
start, without importing it, for a command deciding how to start (flax_lm/hostmem.py).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pkgutil
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Backend:
    """What a platform uses where platforms differ (see above)."""

    attention: str  # attention implementation for float32 compute
    fused_attention: str  # ... for bfloat16 / float16 compute
    scan_layers: bool
    fused_loss: bool
    host_huge_pages: bool


BACKENDS: dict[str, Backend] = {
    "cpu": Backend("reference", "reference", scan_layers=True, fused_loss=False,
                   host_huge_pages=True),
    "cuda": Backend("xla", "cudnn", scan_layers=False, fused_loss=True, host_huge_pages=False),
    "rocm": Backend("xla", "xla", scan_layers=False, fused_loss=True, host_huge_pages=False),
    "tpu": Backend("splash", "splash", scan_layers=True, fused_loss=True,  # v4 and later
                   host_huge_pages=False),
    "tpu_v3": Backend("xla", "xla", scan_layers=True, fused_loss=True,  # and v2
                      host_huge_pages=False),
}
BACKENDS["tpu_v2"] = BACKENDS["tpu_v3"]
# TPU generations before splash attention's (device_kind "TPU v2", "TPU v3"): Mosaic, which
# compiles Pallas kernels for TPUs, targets v4 and later.
OLD_TPU_KIND = re.compile(r"TPU v([23])\b")
OTHER_PLATFORMS = Backend("xla", "xla", scan_layers=True, fused_loss=True, host_huge_pages=False)


def choices_for(platform: str) -> Backend:
    """The choices for `platform` ("cpu", "cuda", "rocm", "tpu" (v4 and later), "tpu_v3",
    "tpu_v2"; JAX's "gpu" counts as "cuda", any other platform gets XLA's attention and no
    host-memory change)."""
    return BACKENDS.get("cuda" if platform == "gpu" else platform, OTHER_PLATFORMS)


def platform() -> str:
    """The platform of JAX's default backend: "cpu", "tpu", "cuda" or "rocm". Starts JAX's
    backends if they are not yet (the caller is about to compute on them)."""
    import jax

    return device_platform(jax.devices()[0])


def device_platform(device: Any) -> str:
    """The platform of a JAX device, as BACKENDS names it: JAX's "gpu" told apart into "cuda"
    and "rocm", TPUs v2 and v3 into "tpu_v2" and "tpu_v3" (a compiled-for topology's devices may
    be of another platform than this process)."""
    if device.platform == "tpu":
        old = OLD_TPU_KIND.match(str(getattr(device, "device_kind", "")))
        return f"tpu_v{old.group(1)}" if old else "tpu"
    if device.platform != "gpu":
        return device.platform
    version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"


# PCI ids of TPU chips, the ones JAX's own hardware detection looks for: Google's vendor id
# and its TPU chips' device ids.
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})
NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")
AMD_DEVICE_FILES = ("/dev/kfd",)


@dataclass(frozen=True)
class Machine:
    """What JAX's plugins would find: an installed plugin and a device for it."""

    tpu_chips: bool
    libtpu: bool
    nvidia_gpu: bool
    cuda_plugin: bool
    amd_gpu: bool
    rocm_plugin: bool


def tpu_chips_here(pci_devices: Path = Path("/sys/bus/pci/devices")) -> bool:
    """Whether this host has TPU chips: their device files, or PCI devices of their ids."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    for vendor in pci_devices.glob("*/vendor"):
        try:
            if vendor.read_text().strip() == GOOGLE_PCI_VENDOR:
                if vendor.with_name("device").read_text().strip() in TPU_PCI_DEVICES:
                    return True
        except OSError:
            continue
    return False


def this_machine(environ: Mapping[str, str]) -> Machine:
    """This machine's accelerators and JAX plugins, found without loading any of them."""
    plugins = {m.name for m in pkgutil.iter_modules() if m.name.startswith("jax_")}
    namespace = importlib.util.find_spec("jax_plugins")
    if namespace is not None and namespace.submodule_search_locations:
        plugins |= {m.name for m in pkgutil.iter_modules(namespace.submodule_search_locations)}
    libtpu = environ.get("TPU_LIBRARY_PATH") or importlib.util.find_spec("libtpu")
    return Machine(
        tpu_chips=tpu_chips_here(),
        libtpu=bool(libtpu),
        nvidia_gpu=any(os.path.exists(f) for f in NVIDIA_DEVICE_FILES),
        cuda_plugin=any(re.search(r"cuda\d*", name) for name in plugins),
        amd_gpu=any(os.path.exists(f) for f in AMD_DEVICE_FILES),
        rocm_plugin=any(re.search(r"rocm\d*", name) for name in plugins),
    )


def startup_platform(environ: Mapping[str, str], machine: Machine | None = None) -> str:
    """The platform JAX will start with this environment on this `machine` (default: this one),
    decided without importing JAX: JAX_PLATFORMS' first entry when set, otherwise the first of
    TPU, NVIDIA GPU, AMD GPU that has both its device and its plugin, otherwise the CPU. A CPU
    machine with libtpu installed (as with `jax[tpu]`) counts as a CPU."""
    requested = environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if requested and requested != "gpu":
        return requested
    machine = this_machine(environ) if machine is None else machine
    if requested == "gpu":
        return "rocm" if machine.rocm_plugin and not machine.cuda_plugin else "cuda"
    if machine.tpu_chips and machine.libtpu:
        return "tpu"
    if machine.nvidia_gpu and machine.cuda_plugin:
        return "cuda"
    if machine.amd_gpu and machine.rocm_plugin:
        return "rocm"
    return "cpu"


def skip_unused_tpu_plugin(
    environ: MutableMapping[str, str], machine: Machine | None = None
) -> bool:
    """Set JAX_PLATFORMS=cpu where libtpu is installed (`jax[tpu]`, as the tests' install has
    it) but the machine has no TPU: JAX would load libtpu first anyway, which prints warnings
    about the TPU it cannot find and takes /tmp/libtpu_lockfile before JAX falls back to the
    same CPU backend. An explicit JAX_PLATFORMS, or a TPU or GPU that JAX would use, is left
    alone. Returns whether it set it."""
    if "JAX_PLATFORMS" in environ:
        return False
    machine = this_machine(environ) if machine is None else machine
    if not machine.libtpu or startup_platform(environ, machine) != "cpu":
        return False
    environ["JAX_PLATFORMS"] = "cpu"
    return True
