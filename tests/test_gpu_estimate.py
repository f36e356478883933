"""bench/gpu_estimate.py's reading of a compiled program: kernels, how often they run, the bytes
they move and the matmul FLOPs they do, on XLA:CPU's own output and on a small GPU-like module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_estimate", REPO / "bench" / "gpu_estimate.py")
gpu_estimate = importlib.util.module_from_spec(spec)
sys.modules["gpu_estimate"] = gpu_estimate  # its dataclasses look their module up there
spec.loader.exec_module(gpu_estimate)

ROWS, WIDTH, LAYERS = 16, 64, 5


def test_a_compiled_scan_of_matmuls_counts_every_trip():
    """XLA:CPU's program for LAYERS scanned matmuls: the loop body's kernels run LAYERS times,
    and the matmul FLOPs are exactly LAYERS x 2 x rows x width x width."""

    def layers(x, w):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    x = jax.ShapeDtypeStruct((ROWS, WIDTH), jnp.float32)
    w = jax.ShapeDtypeStruct((LAYERS, WIDTH, WIDTH), jnp.float32)
    hlo = jax.jit(layers).lower(x, w).compile().as_text()
    found = gpu_estimate.estimate(hlo, bandwidth=1e12, bf16_peak=1e14)
    assert found["matmul_flops"] == LAYERS * 2 * ROWS * WIDTH * WIDTH
    assert found["launches"] >= LAYERS
    # every layer reads at least its own weights once
    assert found["bytes"] >= LAYERS * WIDTH * WIDTH * 4
    # a range, each launch at least its least time
    low, central, high = (found["step_seconds"][k] for k in ("low", "central", "high"))
    assert 0 < low < central < high
    assert low >= found["launches"] * gpu_estimate.RANGES["low"].launch_seconds


# A loop of 4 trips whose body writes one row of a stacked [4, 8, 32] buffer in place from a
# gemm fusion, reads one row of another through a dynamic slice, and a cond whose true branch
# (taken) is one kernel, the false one another.
MODULE = """HloModule example

%gemm (p0: bf16[8,16], p1: bf16[16,32]) -> f32[8,32] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,32]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%update (q0: f32[4,8,32], q1: f32[8,32], q2: s32[]) -> f32[4,8,32] {
  %q0 = f32[4,8,32]{2,1,0} parameter(0)
  %q1 = f32[8,32]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %bitcast.1 = f32[1,8,32]{2,1,0} bitcast(%q1)
  %zero = s32[] constant(0)
  ROOT %dus = f32[4,8,32]{2,1,0} dynamic-update-slice(%q0, %bitcast.1, %q2, %zero, %zero)
}

%take (r0: f32[4,8,32], r1: s32[]) -> f32[1,8,32] {
  %r0 = f32[4,8,32]{2,1,0} parameter(0)
  %r1 = s32[] parameter(1)
  %zero.1 = s32[] constant(0)
  %ds = f32[1,8,32]{2,1,0} dynamic-slice(%r0, %r1, %zero.1, %zero.1), dynamic_slice_sizes={1,8,32}
  ROOT %neg = f32[1,8,32]{2,1,0} negate(%ds)
}

%body (t: (s32[], f32[4,8,32], f32[4,8,32], bf16[8,16], bf16[16,32])) -> (s32[], f32[4,8,32], f32[4,8,32], bf16[8,16], bf16[16,32]) {
  %t = (s32[], f32[4,8,32]{2,1,0}, f32[4,8,32]{2,1,0}, bf16[8,16]{1,0}, bf16[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %stack = f32[4,8,32]{2,1,0} get-tuple-element(%t), index=1
  %other = f32[4,8,32]{2,1,0} get-tuple-element(%t), index=2
  %a = bf16[8,16]{1,0} get-tuple-element(%t), index=3
  %b = bf16[16,32]{1,0} get-tuple-element(%t), index=4
  %gemm_fusion = f32[8,32]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm
  %update_fusion = f32[4,8,32]{2,1,0} fusion(%stack, %gemm_fusion, %i), kind=kLoop, calls=%update
  %take_fusion = f32[1,8,32]{2,1,0} fusion(%other, %i), kind=kLoop, calls=%take
  ROOT %out = (s32[], f32[4,8,32]{2,1,0}, f32[4,8,32]{2,1,0}, bf16[8,16]{1,0}, bf16[16,32]{1,0}) tuple(%i, %update_fusion, %other, %a, %b)
}

%cond (c: (s32[], f32[4,8,32], f32[4,8,32], bf16[8,16], bf16[16,32])) -> pred[] {
  %c = (s32[], f32[4,8,32]{2,1,0}, f32[4,8,32]{2,1,0}, bf16[8,16]{1,0}, bf16[16,32]{1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

%taken (u: f32[1024]) -> f32[1024] {
  %u = f32[1024]{0} parameter(0)
  ROOT %e = f32[1024]{0} exponential(%u)
}

%skipped (v: f32[1024]) -> f32[1024] {
  %v = f32[1024]{0} parameter(0)
  %w = f32[1024]{0} negate(%v)
  ROOT %x = f32[1024]{0} negate(%w)
}

ENTRY %main (s: f32[4,8,32], o: f32[4,8,32], a: bf16[8,16], b: bf16[16,32], y: f32[1024], flag: pred[]) -> f32[1024] {
  %s = f32[4,8,32]{2,1,0} parameter(0)
  %o = f32[4,8,32]{2,1,0} parameter(1)
  %a.1 = bf16[8,16]{1,0} parameter(2)
  %b.1 = bf16[16,32]{1,0} parameter(3)
  %y = f32[1024]{0} parameter(4)
  %flag = pred[] parameter(5)
  %start = s32[] constant(0)
  %init = (s32[], f32[4,8,32]{2,1,0}, f32[4,8,32]{2,1,0}, bf16[8,16]{1,0}, bf16[16,32]{1,0}) tuple(%start, %s, %o, %a.1, %b.1)
  %loop = (s32[], f32[4,8,32]{2,1,0}, f32[4,8,32]{2,1,0}, bf16[8,16]{1,0}, bf16[16,32]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %branch = f32[1024]{0} conditional(%flag, %y, %y), true_computation=%taken, false_computation=%skipped
}
"""


def test_kernels_are_charged_what_they_move():
    kernels = gpu_estimate.Program(MODULE).kernels
    by_name = {k.name: k for k in kernels}
    assert set(by_name) == {"gemm_fusion", "update_fusion", "take_fusion", "e"}
    gemm = by_name["gemm_fusion"]
    assert (gemm.runs, gemm.flops) == (4, 2 * 8 * 32 * 16)
    assert gemm.bytes == 8 * 16 * 2 + 16 * 32 * 2 + 8 * 32 * 4  # operands in, output out
    # in place: the stacked buffer is neither read nor rewritten, only one [8, 32] row written
    # (and the gemm's output read), plus the index
    update = by_name["update_fusion"]
    assert update.bytes == 8 * 32 * 4 + 4 + 8 * 32 * 4
    # the other stack is read one row at a time, through the slice
    take = by_name["take_fusion"]
    assert take.bytes == 8 * 32 * 4 + 4 + 8 * 32 * 4
    # the cond: its true branch only, one kernel
    assert (by_name["e"].runs, by_name["e"].bytes) == (1, 2 * 1024 * 4)


# cuBLAS calls as XLA:GPU writes them: a batched product (attention's scores, [12, 512, 64] x
# [12, 64, 512]) and a weight gradient contracting the rows ([16384, 768]^T x [16384, 2304]),
# each returning (product, workspace).
CUBLAS_MODULE = """HloModule cublas

ENTRY %main (q: bf16[12,512,64], k: bf16[12,64,512], x: bf16[16384,768], g: bf16[16384,2304]) -> bf16[768,2304] {
  %q = bf16[12,512,64]{2,1,0} parameter(0)
  %k = bf16[12,64,512]{2,1,0} parameter(1)
  %x = bf16[16384,768]{1,0} parameter(2)
  %g = bf16[16384,2304]{1,0} parameter(3)
  %scores = (bf16[12,512,512]{2,1,0}, s8[4194304]{0}) custom-call(%q, %k), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":["0"]}}}
  %wgrad = (bf16[768,2304]{1,0}, s8[4194304]{0}) custom-call(%x, %g), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["0"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %out = bf16[768,2304]{1,0} get-tuple-element(%wgrad), index=0
}
"""


def test_cublas_calls_are_charged_the_flops_of_their_dot_dimensions():
    by_name = {k.name.split(" ")[0]: k for k in gpu_estimate.Program(CUBLAS_MODULE).kernels}
    assert by_name["scores"].flops == 2 * 12 * 512 * 512 * 64
    assert by_name["wgrad"].flops == 2 * 768 * 2304 * 16384
    found = gpu_estimate.estimate(CUBLAS_MODULE, bandwidth=4.8e12, bf16_peak=989e12)
    assert found["matmul_flops"] == 2 * 12 * 512 * 512 * 64 + 2 * 768 * 2304 * 16384
    # the weight gradient is matmul-bound: its central time is its FLOPs at the matmul share
    wgrad = by_name["wgrad"].seconds(4.8e12, 989e12, gpu_estimate.RANGES["central"])
    assert wgrad == pytest.approx(2 * 768 * 2304 * 16384
                                  / (989e12 * gpu_estimate.RANGES["central"].matmul))
