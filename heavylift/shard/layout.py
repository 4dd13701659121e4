"""Shard arithmetic: which rows of a parameter a rank owns under FSDP2's dim-0 sharding.

FSDP2 splits each parameter along dim 0 the way ``torch.chunk`` does: chunks of ``ceil(rows / world)``
rows, the last ones shorter or empty. Pure functions; the engine checks its result against the shard
FSDP2 actually made.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def shard_row_range(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Half-open row range [start, stop) of ``rank``'s shard of a tensor with ``rows`` rows."""
    if rows == 0:
        return 0, 0
    chunk = math.ceil(rows / world_size)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def local_shard(full: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's shard of ``full`` (a view; 0-d tensors are treated as one row)."""
    if full.dim() == 0:
        return full.reshape(1) if rank == 0 else full.reshape(1)[:0]
    start, stop = shard_row_range(full.shape[0], rank, world_size)
    return full[start:stop]


def local_shape(shape: torch.Size, rank: int, world_size: int) -> torch.Size:
    if len(shape) == 0:
        return torch.Size([1 if rank == 0 else 0])
    start, stop = shard_row_range(shape[0], rank, world_size)
    return torch.Size([stop - start, *shape[1:]])


def first_element(shape: torch.Size, rank: int, world_size: int) -> int:
    """Index, in the full parameter (row-major), of the first element of ``rank``'s shard."""
    if len(shape) == 0:
        return 0
    return shard_row_range(shape[0], rank, world_size)[0] * math.prod(shape[1:])
