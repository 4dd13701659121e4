"""DCP planners that save and load NVMe-resident optimizer state one tensor at a time.

``tensor_state`` lists NVMe state as stand-ins (shape and dtype, no memory), so DCP's plans, metadata and
resharding are those of RAM state. When DCP's writer asks for a stand-in's bytes (``lookup_object``), the
planner reads that one tensor from the state file; when its reader asks for the tensor to fill
(``lookup_tensor``), it reads it too (a resharded load may fill it in pieces), and ``commit_tensor``
writes it back. DCP orders a save's tensors by size, not by bucket, so reading whole buckets would read
each one many times; one tensor at a time reads every byte of the file once and keeps host memory at
the largest tensor.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner

from heavylift.checkpoint.state import nvme_keys


class _Resident:
    """Mixed into DCP's default planners: NVMe keys resolve to a tensor read from the state file."""

    def __init__(self, engine):
        super().__init__()
        self._ring = engine.ring
        self._keys = nvme_keys(engine)
        self._filling: dict[str, Tensor] = {}  # loads: tensors being filled, written back on commit

    def _read(self, index, default):
        if index.fqn not in self._keys:
            return default(index)
        t = self._ring.read_tensor(*self._keys[index.fqn])
        self._filling[index.fqn] = t
        return t


class NvmeSavePlanner(_Resident, DefaultSavePlanner):
    def lookup_object(self, index):
        t = self._read(index, super().lookup_object)
        self._filling.pop(index.fqn, None)  # DCP writes it and lets it go
        return t


class NvmeLoadPlanner(_Resident, DefaultLoadPlanner):
    def lookup_tensor(self, index):
        return self._read(index, super().lookup_tensor)

    def commit_tensor(self, read_item, tensor) -> None:
        fqn = read_item.dest_index.fqn
        if fqn in self._filling:  # the read tensor (which ``tensor`` is a piece of) goes back to the file
            self._ring.write_tensor(*self._keys[fqn], self._filling.pop(fqn))


def planners(engine):
    """(save planner, load planner) for ``engine``; both None without NVMe state (DCP's defaults)."""
    if getattr(engine, "ring", None) is None:
        return None, None
    return NvmeSavePlanner(engine), NvmeLoadPlanner(engine)
