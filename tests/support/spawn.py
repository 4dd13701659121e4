"""Spawning gloo ranks for tests/dist: a free port, and each rank's environment for ``init_dist``."""

from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, tests_dir: str | None = None, **extra: str) -> None:
    """In a spawned rank: the variables torch.distributed reads (plus ``extra``), tests/ importable."""
    if tests_dir is not None:
        sys.path.insert(0, tests_dir)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **extra)


def publish(results, out_path: str) -> None:
    """In a spawned rank: gather every rank's ``results`` to rank 0, which writes them as JSON to
    ``out_path``; then leave the process group."""
    import json

    import torch.distributed as dist

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(everyone, f)
    from heavylift.dist.env import shutdown

    shutdown()


def spawn_ranks(worker, world: int, out_dir, *args) -> list:
    """Run ``worker(rank, world, port, out_path, tests_dir, *args)`` on ``world`` gloo ranks and return
    what they ``publish``ed: one entry per rank. The native kernel is built here first, once (ranks
    building it at the same time would race for one build directory)."""
    import json

    import torch.multiprocessing as mp

    from heavylift.optim import native

    native.load()
    out = out_dir / "results.json"
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mp.spawn(worker, args=(world, free_port(), str(out), tests_dir, *args), nprocs=world, join=True)
    with open(out) as f:
        return json.load(f)
