"""Bucket planning (pure): group each rank's parameter shards into buckets in gradient-arrival order.

FSDP2 reduce-scatters one unit (decoder block, or the root) at a time, last block first and the root
(embeddings, final norm, head) last. A bucket never spans two units and never splits a parameter, so a
bucket is complete exactly when its unit's reduce-scatter has run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamSpec:
    name: str
    numel: int  # of this rank's shard
    group: int  # optimizer param-group index


@dataclass(frozen=True)
class BucketSpec:
    index: int  # position in gradient-arrival order
    unit: int  # FSDP unit: 0..n_blocks-1 for blocks, n_blocks for the root
    params: tuple[ParamSpec, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)


def plan_buckets(units: list[list[ParamSpec]], bucket_params: int) -> list[BucketSpec]:
    """``units`` in forward order (blocks, then the root last); buckets come out in arrival order:
    blocks from last to first, then the root."""
    order = list(range(len(units) - 2, -1, -1)) + [len(units) - 1]
    buckets: list[BucketSpec] = []
    for unit in order:
        current: list[ParamSpec] = []
        size = 0
        for p in units[unit]:
            if current and size + p.numel > bucket_params:
                buckets.append(BucketSpec(len(buckets), unit, tuple(current)))
                current, size = [], 0
            current.append(p)
            size += p.numel
        if current:
            buckets.append(BucketSpec(len(buckets), unit, tuple(current)))
    return buckets


def split_tail(buckets: list[BucketSpec], ratio: float) -> int:
    """Index of the first GPU-tail bucket: the last ``1 - ratio`` of parameters, by arrival order,
    rounded to whole buckets. ``ratio == 1`` keeps everything on the CPU."""
    total = sum(b.numel for b in buckets)
    budget = (1.0 - ratio) * total
    first = len(buckets)
    acc = 0
    while first > 0 and acc + buckets[first - 1].numel <= budget + 0.5:
        acc += buckets[first - 1].numel
        first -= 1
    return first
