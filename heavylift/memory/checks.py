"""The planner's judgements of a plan: each tier's verdict against the machine (fits, tight, no, unknown)
with the reasons it prints, the free disk NVMe state needs, and the setup's own range checks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from heavylift.config.errors import HeavyliftError
from heavylift.memory.constants import GPU_UNCERTAINTY, HOST_UNCERTAINTY, NVME_UNCERTAINTY, STATE_FORMATS, GiB
from heavylift.offload.nvme import DISK_MARGIN

if TYPE_CHECKING:
    from heavylift.memory.plan import Machine, Plan, Setup


def verdict(need: int, have: int | None, uncertainty: float) -> str:
    if have is None:
        return "unknown"
    if need * (1 + uncertainty) <= have:
        return "fits"
    if need * (1 - uncertainty) <= have:
        return "tight"
    return "no"


def verdicts(p: Plan, m: Machine) -> None:
    v = p.verdicts
    v["gpu"] = verdict(p.gpu_peak, m.gpu_usable, GPU_UNCERTAINTY)
    v["host"] = verdict(p.host_peak_node, m.host_available_bytes, HOST_UNCERTAINTY)
    pinned = p.pinned
    if p.setup.pin and m.has_cuda and m.memlock_bytes is not None:
        v["pinned"] = "fits" if pinned <= m.memlock_bytes else "no"
    if p.setup.offload_device == "nvme":  # no NVMe bucket: no state file, nothing to check (as in the engine)
        v["nvme"] = verdict(nvme_need(p), m.nvme_free_bytes, NVME_UNCERTAINTY) if p.nvme else "fits"
    if v["gpu"] in ("no", "tight"):
        p.reasons.append(f"GPU: peak {p.gpu_peak / GiB:.1f} GiB per rank ({max(p.gpu_phases, key=p.gpu_phases.get)} "
                         f"phase, +-{GPU_UNCERTAINTY:.0%}) against {m.gpu_usable / GiB:.1f} GiB usable")
    if v["host"] in ("no", "tight"):
        p.reasons.append(f"host: {p.host_peak_node / GiB:.1f} GiB per node ({p.setup.gpus_per_node} rank(s) x "
                         f"{p.host_peak_rank / GiB:.1f} GiB) against {m.host_available_bytes / GiB:.1f} GiB available")
    if v.get("pinned") == "no":
        p.reasons.append(f"pinned: {pinned / GiB:.1f} GiB per rank but `ulimit -l` allows "
                         f"{m.memlock_bytes / GiB:.2f} GiB: raise it (ulimit -l unlimited / --ulimit memlock=-1) "
                         "or set engine.offload.pin_memory false")
    if v.get("nvme") in ("no", "tight"):
        p.reasons.append(f"NVMe: {nvme_need(p) / GiB:.1f} GiB per node ({p.setup.gpus_per_node} rank(s) x "
                         f"{p.nvme / GiB:.1f} GiB state file + {DISK_MARGIN / GiB:.0f} GiB margin) against "
                         f"{m.nvme_free_bytes / GiB:.1f} GiB free" + (f" at {m.nvme_path}" if m.nvme_path else ""))


def nvme_need(p: Plan) -> int:
    """Free disk the node's state files need at offload.nvme_path: every rank's file and the engine's margin."""
    return p.nvme * p.setup.gpus_per_node + DISK_MARGIN if p.nvme else 0


def check_setup(s: Setup) -> None:
    for key in ("gpus_per_node", "nodes", "seq", "mbs", "accum"):
        if getattr(s, key) < 1:
            raise HeavyliftError(f"{key.replace('_', ' ')} must be an integer >= 1, not {getattr(s, key)}")
    if s.state_format not in STATE_FORMATS and s.state_format != "auto":
        raise HeavyliftError(f"state format {s.state_format!r} does not exist yet: use auto, "
                             f"{', '.join(STATE_FORMATS)}")
    if s.tail_ratio is not None and not 0.0 <= s.tail_ratio <= 1.0:
        raise HeavyliftError(f"tail ratio must be in [0, 1] (the fraction of parameters stepped on the GPU), "
                             f"not {s.tail_ratio}")
    if s.offload_device not in ("cpu", "nvme"):
        raise HeavyliftError(f"offload.device must be cpu or nvme, not {s.offload_device!r}")
    if s.nvme_ratio is not None and not (s.offload_device == "nvme" and 0.0 <= s.nvme_ratio <= 1.0):
        raise HeavyliftError(f"nvme ratio (offload.nvme_ratio, --nvme-ratio) must be in [0, 1], the fraction of the "
                             f"host-stepped parameters whose state is on NVMe, and needs offload.device nvme "
                             f"(--nvme PATH or --nvme-free-gib), not {s.nvme_ratio} with device {s.offload_device}")
    if not 0.0 <= s.gpu_assist <= 1.0:
        raise HeavyliftError(f"gpu assist (offload.gpu_assist, --gpu-assist) must be in [0, 1], not {s.gpu_assist}")
    if s.host_accumulate and s.state_format != "auto":  # auto: the slot follows the format estimate() picks
        from heavylift.optim import grad_slot

        why = grad_slot.host_sums_refused(grad_slot.resolve(s.grad_slot, s.state_format, s.compute_dtype),
                                          s.compute_dtype)
        if why:
            raise HeavyliftError(why)
    if s.nvme_buffers < 1:
        raise HeavyliftError(f"nvme buffers (offload.nvme_buffers, --nvme-buffers) must be an integer >= 1, "
                             f"not {s.nvme_buffers}")
