"""This CPU's matmul rate per dtype (GFLOP/s) and the bf16 slowdown precision.dtype auto decides by.

    python benchmarks/cpu_matmul_dtypes.py        (one JSON line)
"""

from __future__ import annotations

import json
import os
import time

import torch

from heavylift.models.compute_dtype import SLOWER, cpu_bf16_slowdown


def gflops(dtype: torch.dtype, n: int = 1024, reps: int = 3) -> float:
    a = torch.randn(n, n).to(dtype)
    a @ a
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    return reps * 2 * n**3 / (time.perf_counter() - t) / 1e9


if __name__ == "__main__":
    print(json.dumps({"cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "fp32_gflops": round(gflops(torch.float32), 1), "bf16_gflops": round(gflops(torch.bfloat16), 2),
                      "probe_bf16_slowdown": round(cpu_bf16_slowdown(), 1), "auto_picks_fp32_above": SLOWER}))
