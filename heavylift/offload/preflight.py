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


def check_host_memory(host_bytes: int, pinned_bytes: int, pin: bool) -> None:
    """Raise HeavyliftError if the host state cannot fit in available RAM or the pinned-memory limit."""
    avail = mem_available_bytes()
    if avail is not None and host_bytes > avail:
        raise HeavyliftError(
            f"the optimizer state needs {host_bytes / GiB:.1f} GiB of host RAM but only {avail / GiB:.1f} GiB "
            "is available: use more GPUs (state is sharded across ranks), turn off offload.speculate "
            "(saves 12 bytes/param), or raise offload-ratio tail on the GPU (lower offload.ratio)")
    if pin:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft != resource.RLIM_INFINITY and pinned_bytes > soft:
            raise HeavyliftError(
                f"heavylift needs {pinned_bytes / GiB:.1f} GiB of pinned host memory but `ulimit -l` allows "
                f"{soft / GiB:.2f} GiB: raise it (`ulimit -l unlimited`, or memlock in "
                "/etc/security/limits.conf / the container's --ulimit memlock=-1), or set offload.pin_memory: false "
                "(transfers then run ~8x slower)")
