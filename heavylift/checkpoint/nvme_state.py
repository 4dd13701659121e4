"""DCP planners that save and load NVMe-resident optimizer state through the ring, one bucket at a time.

``tensor_state`` lists NVMe state as stand-ins (shape and dtype, no memory), so DCP's plans, metadata and
resharding are those of RAM state. When DCP's writer asks for a stand-in's bytes (``lookup_object``), or
its reader for the tensor to fill (``lookup_tensor``), the planner makes that bucket resident in a ring
buffer set (``NvmeRing.hold``) and returns the live view; moving on to another bucket lets go of the
previous one (written back to the state file after a load). DCP asks in state-dict order, which is bucket
order, so each bucket is read once, and host memory stays at the ring's size: the checkpoint is written
one file per tensor, and DCP copies each view before writing it.
"""

from __future__ import annotations

from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner

from heavylift.checkpoint.state import nvme_keys


class _Resident:
    """Mixed into DCP's default planners: NVMe keys resolve to the live view of a resident bucket."""

    def __init__(self, engine, write: bool):
        super().__init__()
        self._engine, self._write = engine, write  # write: a load, whose buckets are written back
        self._keys = nvme_keys(engine)

    def _live(self, index, default):
        if index.fqn not in self._keys:
            return default(index)
        b, i, kind = self._keys[index.fqn]
        self._engine.ring.hold(b, dirty=self._write)
        return self._engine.buckets[b].slots[i].state[kind]


class NvmeSavePlanner(_Resident, DefaultSavePlanner):
    def lookup_object(self, index):
        return self._live(index, super().lookup_object)


class NvmeLoadPlanner(_Resident, DefaultLoadPlanner):
    def lookup_tensor(self, index):
        return self._live(index, super().lookup_tensor)


def planners(engine):
    """(save planner, load planner) for ``engine``; both None without NVMe state (DCP's defaults)."""
    if getattr(engine, "ring", None) is None:
        return None, None
    return NvmeSavePlanner(engine, write=False), NvmeLoadPlanner(engine, write=True)
