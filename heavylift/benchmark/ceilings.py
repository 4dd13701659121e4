"""The box's ceilings, measured in the same run as the systems compared:
pinned host<->GPU bandwidth each way and both at once, the bf16 matmul rate, and CPU AdamW throughput
(torch's fused kernel and heavylift's native one) over fp32 state.

    python -m heavylift.benchmark.ceilings      (prints one JSON line)
"""

from __future__ import annotations

import json
import time

import torch


def _timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def link_gbs(nbytes: int = 2 * 1024**3) -> dict[str, float]:
    """Pinned host->GPU, GPU->host and both at once (fp32 copies of ``nbytes``), in GB/s."""
    n = nbytes // 4
    host_a = torch.empty(n, dtype=torch.float32, pin_memory=True)
    host_b = torch.empty(n, dtype=torch.float32, pin_memory=True)
    dev_a = torch.empty(n, dtype=torch.float32, device="cuda")
    dev_b = torch.empty(n, dtype=torch.float32, device="cuda")
    up, down = torch.cuda.Stream(), torch.cuda.Stream()
    h2d = _timed(lambda: dev_a.copy_(host_a, non_blocking=True), 3)
    d2h = _timed(lambda: host_b.copy_(dev_b, non_blocking=True), 3)

    def both():
        with torch.cuda.stream(up):
            dev_a.copy_(host_a, non_blocking=True)
        with torch.cuda.stream(down):
            host_b.copy_(dev_b, non_blocking=True)

    duplex = _timed(both, 3)
    return {"h2d_gbs": nbytes / h2d / 1e9, "d2h_gbs": nbytes / d2h / 1e9, "both_gbs": 2 * nbytes / duplex / 1e9}


def matmul_tflops(n: int = 8192) -> float:
    """bf16 n^3 matmul rate in TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / _timed(lambda: a @ b, 10) / 1e12


def cpu_adamw_params_per_s(n: int = 256 * 1024**2, threads: int | None = None) -> dict[str, float]:
    """One AdamW pass over ``n`` fp32 params with the optimizer's thread count: torch's fused kernel in
    place, and heavylift's native kernel out of place (the speculative step) when it builds."""
    from heavylift.engine import auto_cpu_threads
    from heavylift.optim import native
    from heavylift.optim.adamw import AdamWHyper, adamw_step_

    old = torch.get_num_threads()
    torch.set_num_threads(threads or auto_cpu_threads())
    try:
        p, m, v, g = (torch.rand(n) for _ in range(4))
        steps, hp = [torch.zeros(())], AdamWHyper(1e-5, 0.9, 0.999, 1e-8, 0.0)
        out = {"threads": torch.get_num_threads()}
        adamw_step_([p], [g], [m], [v], steps, hp)
        t = time.perf_counter()
        adamw_step_([p], [g], [m], [v], steps, hp)
        out["torch_fused"] = n / (time.perf_counter() - t)
        k = native.load()
        if k is not None:
            p2, m2, v2 = torch.empty_like(p), torch.empty_like(m), torch.empty_like(v)
            k.adamw_step(p, m, v, g, p2, m2, v2, 1e-5, 0.9, 0.999, 1e-8, 0.0, 2, 1.0)
            t = time.perf_counter()
            k.adamw_step(p, m, v, g, p2, m2, v2, 1e-5, 0.9, 0.999, 1e-8, 0.0, 2, 1.0)
            out["native_out_of_place"] = n / (time.perf_counter() - t)
        return out
    finally:
        torch.set_num_threads(old)


def main() -> None:
    print(json.dumps({"card": torch.cuda.get_device_name(), **link_gbs(), "matmul_tflops": matmul_tflops(),
                      "cpu_adamw_params_per_s": cpu_adamw_params_per_s()}), flush=True)


if __name__ == "__main__":
    main()
