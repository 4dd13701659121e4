"""This machine as the planner sees it: free memory, limits, and short probes of its rates."""

from __future__ import annotations

import os
import resource
import time

from heavylift.memory.constants import CUDA_CONTEXT_BYTES, DEFAULT_GPU_TFLOPS, DEFAULT_LINK_GBS, GiB
from heavylift.memory.plan import Machine, Rates


def mem_available() -> int | None:
    from heavylift.offload.preflight import mem_available_bytes
    return mem_available_bytes()


def memlock_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def this_machine(gpu_mem_gib: float | None = None, host_mem_gib: float | None = None,
                 device_index: int | None = None) -> Machine:
    """The machine this runs on; ``gpu_mem_gib`` / ``host_mem_gib`` describe another one instead."""
    import torch
    cuda = torch.cuda.is_available()
    total = free = None
    name = ""
    if gpu_mem_gib is not None:
        total = int(gpu_mem_gib * GiB)
    elif cuda:
        idx = device_index if device_index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        free, total = torch.cuda.mem_get_info(idx)
        free += CUDA_CONTEXT_BYTES  # mem_get_info already sees this process's context; usable subtracts it
        name = torch.cuda.get_device_name(idx)
    host = int(host_mem_gib * GiB) if host_mem_gib is not None else mem_available()
    return Machine(gpu_total_bytes=total, gpu_free_bytes=free, host_available_bytes=host,
                   memlock_bytes=None if host_mem_gib is not None or gpu_mem_gib is not None else memlock_limit(),
                   has_cuda=cuda, gpu_name=name)


def probe_rates(gpu_tflops: float | None = None, cpu_params_per_s: float | None = None,
                link_gbs: float | None = None, threads: int | None = None) -> Rates:
    """Stated rates, else short probes of this machine (a second or two each), else defaults."""
    import torch
    cuda = torch.cuda.is_available()
    src = ["given", "given", "given"]
    if gpu_tflops is None:
        gpu_tflops, src[0] = (_probe_matmul(), "probed") if cuda else (DEFAULT_GPU_TFLOPS, "assumed (H100 matmul)")
    if cpu_params_per_s is None:
        cpu_params_per_s, src[1] = _probe_adamw(threads), "probed"
    if link_gbs is None:
        link_gbs, src[2] = (_probe_link(), "probed") if cuda else (DEFAULT_LINK_GBS, "assumed")
    return Rates(gpu_tflops, cpu_params_per_s, link_gbs, tuple(src))


def _probe_matmul(n: int = 8192, reps: int = 10) -> float:
    import torch
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def _probe_adamw(threads: int | None = None, n: int = 64 * 1024 * 1024, reps: int = 2) -> float:
    """Fused CPU AdamW params/s over ``n`` fp32 params with the optimizer's threads (whole host: the
    per-rank rate x ranks per node is bounded by memory bandwidth, so this is the single-rank rate)."""
    import torch
    from heavylift.optim.adamw import AdamWHyper, adamw_step_
    if threads is None:
        from heavylift.engine import auto_cpu_threads
        threads = auto_cpu_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p, g, m, v = (torch.zeros(n) for _ in range(4))
        step = [torch.zeros(())]
        hp = AdamWHyper(1e-5, 0.9, 0.999, 1e-8, 0.0)
        adamw_step_([p], [g], [m], [v], step, hp)
        t = time.perf_counter()
        for _ in range(reps):
            adamw_step_([p], [g], [m], [v], step, hp)
        return n * reps / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)


def _probe_link(nbytes: int = 512 * 1024**2) -> float:
    import torch
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * nbytes / (time.perf_counter() - t) / 1e9
