"""``precision.dtype: auto``: bf16 where the device multiplies bf16 natively, fp32 where it does not.

Every CUDA card heavylift targets has bf16 tensor cores. CPUs differ: with AVX512-BF16 or AMX a bf16
matmul runs at least as fast as an fp32 one; with AVX2 only it is emulated (a 2-core AMD EPYC: 0.94 against
132 GFLOP/s), which makes the embedded default run's steps about 18x slower
(benchmarks/results/2026-12-03-cpu-avx2). A short timed matmul of
each dtype decides, once per process.
"""

from __future__ import annotations

import functools
import time

import torch

SLOWER = 2.0  # bf16 counts as native unless its matmul is this many times slower than fp32's


def _matmul_seconds(dtype: torch.dtype, n: int = 192, reps: int = 3) -> float:
    a = torch.randn(n, n).to(dtype)
    a @ a  # warm the path
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return best


@functools.lru_cache(maxsize=1)
def cpu_bf16_slowdown() -> float:
    """How many times slower this CPU's bf16 matmul is than its fp32 one (measured once; a few ms, or
    ~20 ms where bf16 is emulated). On one thread: the kernels' own speed. With the process's threads, a
    small fp32 matmul on a 2-core VM sometimes waited ~12 ms per call for a thread (against 0.2 ms), which
    made emulated bf16 look 2-3x *faster* and sent the embedded default run to the 18x slower dtype; on one
    thread the same box measured 14-22x slower, every time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _matmul_seconds(torch.bfloat16) / max(_matmul_seconds(torch.float32), 1e-9)
    finally:
        torch.set_num_threads(threads)


def resolve_dtype(requested: str, cuda: bool) -> str:
    """The compute dtype ``precision.dtype`` names: itself, or for "auto" bf16 on a GPU and on a CPU whose
    bf16 matmul is native, else fp32."""
    if requested != "auto":
        return requested
    return "bf16" if cuda or cpu_bf16_slowdown() < SLOWER else "fp32"
