"""This machine as the planner sees it: free memory, limits, and short probes of its rates."""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import time

from heavylift.memory.constants import CUDA_CONTEXT_BYTES, DEFAULT_GPU_TFLOPS, DEFAULT_LINK_GBS, DEFAULT_NVME_GBS, GiB
from heavylift.memory.plan import Machine, Rates


def mem_available() -> int | None:
    from heavylift.offload.preflight import mem_available_bytes
    return mem_available_bytes()


def memlock_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def capped_card_bytes(card_bytes: int, gpu_memory_gib: float | None) -> int:
    """A card's total as a run capped at ``gpu_memory_gib`` of allocator memory (engine.gpu_memory_gib) may use
    it, counted as a card's total is (its CUDA context included, which usable memory then subtracts)."""
    if gpu_memory_gib is None:
        return card_bytes
    return min(card_bytes, int(gpu_memory_gib * GiB) + CUDA_CONTEXT_BYTES)


def capped(machine: Machine, gpu_memory_gib: float | None) -> Machine:
    """The machine as a run capped at ``gpu_memory_gib`` per card sees it: what its tensors may take is the
    smaller of the card's and the cap (the engine plans with the same rule: capped_card_bytes)."""
    if gpu_memory_gib is None or machine.gpu_total_bytes is None:
        return machine
    free = machine.gpu_free_bytes
    return dataclasses.replace(machine, gpu_total_bytes=capped_card_bytes(machine.gpu_total_bytes, gpu_memory_gib),
                               gpu_free_bytes=None if free is None else capped_card_bytes(free, gpu_memory_gib))


def disk_free(path: str) -> int | None:
    """Free bytes of the file system holding ``path``; None if it is not an existing directory."""
    return shutil.disk_usage(path).free if path and os.path.isdir(path) else None


def this_machine(gpu_mem_gib: float | None = None, host_mem_gib: float | None = None,
                 device_index: int | None = None, nvme_path: str = "", nvme_free_gib: float | None = None) -> Machine:
    """The machine this runs on; ``gpu_mem_gib`` / ``host_mem_gib`` / ``nvme_free_gib`` describe another one
    instead. ``nvme_path``: the directory whose free space the NVMe state files would take."""
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
                   has_cuda=cuda, gpu_name=name, nvme_path=nvme_path,
                   nvme_free_bytes=int(nvme_free_gib * GiB) if nvme_free_gib is not None else disk_free(nvme_path))


def probe_rates(gpu_tflops: float | None = None, cpu_params_per_s: float | None = None,
                link_gbs: float | None = None, threads: int | None = None, nvme_gbs: float | None = None,
                nvme_path: str = "") -> Rates:
    """Stated rates, else short probes of this machine (a second or two each), else defaults. The disk is
    probed only with ``nvme_path`` and no ``nvme_gbs``."""
    import torch
    cuda = torch.cuda.is_available()
    src = ["given", "given", "given"]
    if gpu_tflops is None:
        gpu_tflops, src[0] = (_probe_matmul(), "probed") if cuda else (DEFAULT_GPU_TFLOPS, "assumed (H100 matmul)")
    if cpu_params_per_s is None:
        cpu_params_per_s, src[1] = _probe_adamw(threads), "probed"
    if link_gbs is None:
        link_gbs, src[2] = (_probe_link(), "probed") if cuda else (DEFAULT_LINK_GBS, "assumed")
    nvme_source = "given"
    if nvme_gbs is None:
        nvme_gbs, nvme_source = probe_nvme(nvme_path) if nvme_path else (DEFAULT_NVME_GBS, "assumed")
    return Rates(gpu_tflops, cpu_params_per_s, link_gbs, tuple(src), nvme_gbs, nvme_source)


PROBE_NVME_BYTES = 256 << 20


def probe_nvme(path: str, nbytes: int = PROBE_NVME_BYTES) -> tuple[float, str]:
    """(GB/s, how it was measured): ``nbytes`` written (and fsynced) then read back through the NVMe tier's
    own StateFile in ``path`` (O_DIRECT where the file system allows it), the bytes over the time of both,
    as a step moves them; the probe file is removed."""
    import torch

    from heavylift.offload.nvme import StateFile, aligned_empty
    nbytes = max(nbytes >> 20, 1) << 20  # whole MiB
    buf = aligned_empty(nbytes, torch.uint8)
    buf.view(-1, 1 << 20).copy_(torch.randint(0, 256, (1 << 20,), dtype=torch.uint8))  # not all zeros
    f = StateFile(path, 0, [[nbytes]], name=f"heavylift-probe-{os.getpid()}.tmp")
    try:
        t0 = time.perf_counter()
        f.write(0, [buf]).result()
        os.fsync(f.fd)
        t1 = time.perf_counter()
        f.read(0, [buf]).result()
        t2 = time.perf_counter()
    finally:
        f.close()
    gbs = 2 * nbytes / (t2 - t0) / 1e9
    how = (f"probed: {nbytes >> 20} MiB written {nbytes / (t1 - t0) / 1e9:.2f}, read {nbytes / (t2 - t1) / 1e9:.2f} "
           f"GB/s in {t2 - t0:.2f} s, " + ("O_DIRECT" if f.direct else "page cache (O_DIRECT refused): an upper bound"))
    return gbs, how


def _probe_matmul() -> float:
    from heavylift.benchmark.ceilings import matmul_tflops
    return matmul_tflops()


def _probe_adamw(threads: int | None = None) -> float:
    """CPU AdamW params/s with the optimizer's threads: the native kernel's rate when it builds (the
    engine's speculative step), else torch's fused kernel. Bounded by host memory bandwidth, so this is
    the single-rank rate."""
    from heavylift.benchmark.ceilings import cpu_adamw_params_per_s
    rates = cpu_adamw_params_per_s(64 * 1024**2, threads)
    return rates.get("native_out_of_place", rates["torch_fused"])


def _probe_link() -> float:
    """Pinned host->GPU GB/s, one direction."""
    from heavylift.benchmark.ceilings import link_gbs
    return link_gbs(512 * 1024**2)["h2d_gbs"]
