"""Deterministic, rank-aware, resumable batches over packed rows.

Epoch ``e`` visits the rows in a permutation drawn from ``seed + e``; rank ``r`` of ``w`` takes every
``w``-th row of it, all ranks the same count (the remainder is left out of that epoch, not of the next:
the permutation changes). The position is (epoch, batch), so ``state_dict`` is three integers and a
resumed loader yields exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from heavylift.config.errors import HeavyliftError


class PackedLoader:
    def __init__(self, rows: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if len(rows) < world_size:
            raise HeavyliftError(f"only {len(rows)} packed rows of data for {world_size} ranks: use more data "
                                 "or a shorter seq_len")
        self.rows, self.batch_size, self.rank, self.world_size = rows, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.per_rank = len(rows) // world_size
        self.batches_per_epoch = math.ceil(self.per_rank / batch_size)
        self.epoch, self.batch = 0, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches forever, epoch after epoch, from the current position."""
        while True:
            order = self._order(self.epoch)
            while self.batch < self.batches_per_epoch:
                take = order[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]
                self.batch += 1
                yield as_batch(self.rows[take])
            self.epoch, self.batch = self.epoch + 1, 0

    def one_pass(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's rows once, in order (evaluation); does not move the position."""
        order = self._order(0)
        for b in range(self.batches_per_epoch):
            yield as_batch(self.rows[order[b * self.batch_size:(b + 1) * self.batch_size]])

    def _order(self, epoch: int) -> torch.Tensor:
        n = self.per_rank * self.world_size
        if self.shuffle:
            order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch))[:n]
        else:
            order = torch.arange(n)
        return order[self.rank::self.world_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise HeavyliftError(f"data loader state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.batch = state["epoch"], state["batch"]


def as_batch(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": rows[:, 0], "labels": rows[:, 1], "position_ids": rows[:, 2]}
