"""``offload.gpu_assist: auto``: the share of a clipped step's host buckets the GPU should step, from the
CPU kernel's rate and the link's, both measured on this machine (offload/assist.py does the stepping).

After the norm, N host params must step before the next forward needs them. The CPU steps (1 - f) N at R
params/s; the assisted f N go up the link with their state S and gradient g bytes per param, while the
CPU's share sends up only its new master (u bytes per param); the down copies use the other direction
and are smaller. The pass ends when the slower of the two ends::

    CPU   |<------------ (1 - f) N / R ------------>|
    link  |<---- (f (S + g) + (1 - f) u) N / B ---->|      equal at  f = (B/R - u) / (B/R - u + S + g)

so the pass takes (1 - f) N / R, 1 / (1 - f) times faster than the CPU alone. One H200 box, qwen3-4b
at ratio 0.8, fp32 (S 12, g 2, u 4), B 55 GB/s, R 4.1 G params/s: f = 0.40, the measured best of 0, 0.4
and 0.7 (a pass 1.8x shorter; benchmarks/results/2026-12-03-h200-session6).
"""

from __future__ import annotations

import time

import torch

MAX_SHARE = 0.9  # the CPU keeps some: the link's rate is measured once, the CPU's drifts with the step


def balanced_share(cpu_params_per_s: float, link_bytes_per_s: float, state_bytes: float, grad_bytes: float,
                   upload_bytes: float) -> float:
    """The share f in [0, MAX_SHARE] at which the CPU's part and the link's part of the pass end together
    (0 where the link is too slow to gain anything: B/R <= u)."""
    if cpu_params_per_s <= 0 or link_bytes_per_s <= 0:
        return 0.0
    room = link_bytes_per_s / cpu_params_per_s - upload_bytes  # link bytes per CPU-stepped param, past its own upload
    if room <= 0:
        return 0.0
    return min(room / (room + state_bytes + grad_bytes), MAX_SHARE)


def pass_speedup(share: float) -> float:
    """How many times shorter the post-norm pass is at a balanced ``share`` than on the CPU alone."""
    return 1.0 / (1.0 - share)


def link_bytes_per_s(device: torch.device, pinned: bool = True, nbytes: int = 64 * 2**20, reps: int = 3) -> float:
    """Host-to-device rate on ``device`` (the assist's bottleneck direction) from pinned memory, or pageable
    where offload.pin_memory is off, best of ``reps``."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(reps + 1):  # the first copy warms the path
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def auto_assist_pinnable(pinned_all_bytes: int, pin: bool, memlock_bytes: int | None) -> bool:
    """Whether ``gpu_assist: auto`` may keep the assist: it pins every host state buffer, so where
    ``ulimit -l`` (``memlock_bytes``, None: unlimited) cannot hold that, auto turns it off rather than
    refuse a run that fits without it. Without pinning (offload.pin_memory off) there is nothing to check."""
    return not pin or memlock_bytes is None or pinned_all_bytes <= memlock_bytes
