"""Process group and device for this rank: torchrun's environment, or a one-process group.

``init_dist`` also (once per process, see ``heavylift.dist.cores``) pins this rank to its own CPU cores,
so call it right after start-up, before the model is built. Collectives time out after
``HEAVYLIFT_COLLECTIVE_TIMEOUT_S`` (default 600 s; see ``heavylift.dist.guard``).

Exit: a gloo worker thread drops a finished collective's tensors after the caller's wait has returned,
and dropping them takes the GIL. If the interpreter is finalizing by then, taking the GIL ends the thread
inside a noexcept C++ frame: "terminate called without an active exception", SIGABRT. A worker that
shares its core with a busy main thread (core binding, a loaded machine) is late enough for that
(docs/log.md). So ``init_dist`` registers :func:`settle_gloo_workers` to run at exit (before finalization),
and ``shutdown`` calls it too: it sleeps, the GIL released, until every gloo worker waits for work.
"""

from __future__ import annotations

import atexit
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from heavylift.dist.cores import CorePlan, bind_cores
from heavylift.dist.guard import collective_timeout_s, nccl_grace_s


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    cores: CorePlan | None = None  # this rank's CPU cores and optimizer thread count

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cpu_threads(self) -> int | None:
        """Optimizer worker threads from the core plan (None without one)."""
        return self.cores.worker_threads if self.cores is not None else None


def process_group_timeout(backend: str) -> timedelta:
    """gloo: the guards' limit itself (its collectives block and raise). NCCL: a little longer, so the
    guarded phases, which poll, report with their name before NCCL's watchdog kills the process."""
    limit = collective_timeout_s()
    return timedelta(seconds=limit + (nccl_grace_s(limit) if backend == "nccl" else 0.0))


def init_dist() -> DistEnv:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU), or make a one-rank gloo group; then
    bind this rank's CPU cores (first call only)."""
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        timeout = process_group_timeout(backend)
        bound = {"device_id": device} if use_cuda else {}  # NCCL: this rank's GPU, not guessed from its rank
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout, **bound)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **bound)
    world = dist.get_world_size()
    rank = dist.get_rank()
    if world > 1 and backend == "gloo":
        _settle_at_exit()
    cores = bind_cores(rank, local_rank, gpu_index=local_rank if use_cuda else None)
    mesh = init_device_mesh(device.type, (world,))
    return DistEnv(rank, world, local_rank, device, mesh, cores)


def shutdown() -> None:
    """Leave the process group together: a barrier, then destroy it, then let the gloo workers finish
    with the last collectives (see the module docstring). A rank that exits while another still holds
    gloo connections to it (rank 0 hosts the rendezvous store) can make the other abort at exit."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    settle_gloo_workers()


_GLOO_WORKER = "pt_gloo_runloop"  # the name ProcessGroupGloo gives its worker threads
_registered = False


def _settle_at_exit() -> None:
    global _registered
    if not _registered:
        atexit.register(settle_gloo_workers)
        _registered = True


def _gloo_workers() -> dict[int, tuple[str, str, str]]:
    """tid -> (state, voluntary, involuntary context switches) of this process's gloo worker threads."""
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:  # not Linux: nothing to watch
        return out
    for tid in tids:
        base = f"/proc/self/task/{tid}"
        try:
            with open(f"{base}/comm") as f:
                if f.read().strip() != _GLOO_WORKER:
                    continue
            with open(f"{base}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # the thread has exited
            continue
        out[int(tid)] = tuple(fields.get(k, "").strip() for k in
                              ("State", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
    return out


def settle_gloo_workers(interval_s: float = 0.01, limit_s: float = 5.0) -> bool:
    """Sleep (the GIL released) until every gloo worker thread is asleep and has not run for a whole
    ``interval_s``: blocked waiting for work, its last collective dropped. A worker waiting for the GIL
    wakes every 5 ms (the interpreter's switch interval) and takes it while this sleeps, so it never
    looks settled. Returns False if ``limit_s`` passed first (then exit goes ahead anyway)."""
    deadline = time.monotonic() + limit_s
    before = _gloo_workers()
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        now = _gloo_workers()
        if now == before and all(v[0].startswith("S") for v in now.values()):
            return True
        before = now
    return False
