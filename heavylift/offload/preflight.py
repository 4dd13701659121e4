"""Host-memory preflight: refuse, with the numbers, before allocating what the machine cannot hold."""

from __future__ import annotations

import resource

from heavylift.config.errors import HeavyliftError

GiB = 1024**3


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host_memory(host_bytes: int, pinned_bytes: int, pin: bool, ranks_per_node: int = 1,
                      available: int | None = None) -> None:
    """Raise HeavyliftError if the host state of this node's ranks (``host_bytes`` each) cannot fit in
    available RAM, or one rank's pinned buffers exceed the pinned-memory limit."""
    avail = available if available is not None else mem_available_bytes()
    need = host_bytes * ranks_per_node
    if avail is not None and need > avail:
        per = f" ({ranks_per_node} ranks x {host_bytes / GiB:.1f} GiB)" if ranks_per_node > 1 else ""
        raise HeavyliftError(
            f"the optimizer state needs {need / GiB:.1f} GiB of host RAM{per} but only {avail / GiB:.1f} GiB "
            "is available: use more nodes (state is sharded across ranks), set offload.state_format: "
            "bf16-moments, int8-moments or bf16-master-int8 (4, 6 or 10 bytes/param less), turn off offload.speculate, or keep more optimizer state "
            "on the GPU (lower offload.ratio)")
    if pin:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft != resource.RLIM_INFINITY and pinned_bytes > soft:
            raise HeavyliftError(
                f"heavylift needs {pinned_bytes / GiB:.1f} GiB of pinned host memory but `ulimit -l` allows "
                f"{soft / GiB:.2f} GiB: raise it (`ulimit -l unlimited`, or memlock in "
                "/etc/security/limits.conf / the container's --ulimit memlock=-1), or set offload.pin_memory: false "
                "(transfers then run ~8x slower)")


NVME_HEADROOM = 0.85  # of MemAvailable that state may take when the rest goes to NVMe: room for the runtime


def nvme_split(host_numels: list[int], fmt, ratio: float | None, available: int | None, ranks_per_node: int,
               ring_depth: int, grad_bytes: float = 4) -> int:
    """How many host buckets (a prefix in arrival order: the earliest-arriving, stepped last) keep their
    state on NVMe; pure.

    ``ratio``: that fraction of the host parameters, rounded to whole buckets. None: the fewest that let
    the rest fit in ``NVME_HEADROOM`` of ``available`` (per node), counting the NVMe buckets' gradient
    slots (``grad_bytes`` per param: offload.grad_slot resolved) and the ring's buffer sets; all of them if
    nothing smaller fits (the preflight then says so), none when ``available`` is unknown. Also the planner's
    rule (memory/plan.py), so ``heavylift estimate`` places the same buckets."""
    total = sum(host_numels)
    if ratio is not None:
        k, acc = 0, 0
        while k < len(host_numels) and acc + host_numels[k] <= ratio * total + 0.5:
            acc += host_numels[k]
            k += 1
        return k
    if available is None:
        return 0
    budget = NVME_HEADROOM * available / ranks_per_node
    for k in range(len(host_numels) + 1):
        on_disk = host_numels[:k]
        ram = (total - sum(on_disk)) * (fmt.back_bytes + grad_bytes) + sum(on_disk) * grad_bytes
        ram += ring_depth * max(on_disk, default=0) * fmt.back_bytes
        if ram <= budget:
            return k
    return len(host_numels)
