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
