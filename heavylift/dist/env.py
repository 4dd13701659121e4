"""Process group and device for this rank: torchrun's environment, or a one-process group.

``init_dist`` also (once per process, see ``heavylift.dist.cores``) pins this rank to its own CPU cores,
so call it right after start-up, before the model is built. Collectives time out after
``HEAVYLIFT_COLLECTIVE_TIMEOUT_S`` (default 600 s; see ``heavylift.dist.guard``).
"""

from __future__ import annotations

import os
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
    if not dist.is_initialized():
        timeout = process_group_timeout(backend)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    world = dist.get_world_size()
    rank = dist.get_rank()
    cores = bind_cores(rank, local_rank, gpu_index=local_rank if use_cuda else None)
    mesh = init_device_mesh(device.type, (world,))
    return DistEnv(rank, world, local_rank, device, mesh, cores)


def shutdown() -> None:
    """Leave the process group together: a barrier, then destroy it. A rank that exits while another
    still holds gloo connections to it (rank 0 hosts the rendezvous store) can make the other abort at
    exit ("terminate called without an active exception")."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
