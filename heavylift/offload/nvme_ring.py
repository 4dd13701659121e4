"""The NVMe tier's ring: the state of NVMe buckets streams through a few page-locked buffer sets, read
from the rank's state file (offload/nvme.py) ahead of its CPU step and written back behind it.

NVMe buckets never speculate: their step waits for the global gradient norm, so a clip or a skip never
needs a second copy of their state on disk. They step in the order the pipeline finishes buckets after
the norm, forward order (the root unit's buckets, then block 0, 1, ...), which is the reverse of
gradient arrival; the reads follow that order, and the first ones are issued when the boundary backward
begins, so they overlap it. The planner puts the earliest-arriving buckets (the last blocks, whose weights
the next forward needs last) on NVMe, so the disk has the whole forward to catch up.

Schedule of one optimizer step, ring depth 3 (sets A, B, C; b0, b1, ... the NVMe buckets in step order)::

    autograd thread          CPU worker thread                     I/O threads (StateFile)   h2d stream
    begin_boundary_backward  task "prefetch": wait old writes
                             read b0 -> A, read b1 -> B  -------->  preadv b0, b1
    backward (RAM buckets speculate meanwhile)
    finish_step: norm -----> finish(b0): wait read b0; bind A
                             AdamW in place in A  ------------------------------------------> A.master -> param, ev0
                             release A: write b0 from A  -------->  pwritev b0
                             read b2 -> C  ---------------------->  preadv b2
                             finish(b1): wait read b1; step in B  -------------------------> ev1
                             release B: write b1; read b3 -> A: waits for write b0 and ev0
    next forward: pre-hook of a unit waits for its buckets' final event and upload event (pipeline.py)

A set is handed to the next read only once its write has completed and its upload event has (both read
the set; neither may see the next bucket's bytes). Everything that needs NVMe state outside a step
(engine init, checkpoints, master weights) goes through ``hold``: one bucket resident at a time, so host
memory stays at the ring whatever the model size.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from concurrent.futures import Future

import torch
from torch import Tensor

from heavylift.offload.nvme import StateFile, aligned_empty
from heavylift.offload.pinned import register, release
from heavylift.offload.store import BucketState, carve, flat_sizes


@dataclass
class _Set:
    """One buffer set: a flat, 4 KiB-aligned buffer per state kind, the size of the largest NVMe bucket."""

    buffers: dict[str, Tensor]
    write: Future | None = None  # the write behind from this set, if any
    upload: object | None = None  # CUDA event of the weight upload from this set, if any
    held: list = field(default_factory=list)


class NvmeRing:
    """Owns the state file and the buffer sets of one rank's NVMe buckets; used by one thread at a time
    (the CPU worker during a step, the training thread between steps)."""

    def __init__(self, buckets: list[BucketState], directory: str, rank: int, depth: int, pin: bool,
                 io_threads: int = 4):
        self.buckets = {b.spec.index: b for b in buckets}
        self.region = {b.spec.index: r for r, b in enumerate(buckets)}
        fmt = buckets[0].fmt
        self.kinds = fmt.kinds
        self._per_block = {b.kind: b.per_block for b in fmt.buffers}
        self._dtype = {b.kind: b.dtype for b in fmt.buffers}
        self._shapes = {b.spec.index: [s.grad.shape for s in b.slots] for b in buckets}
        self._sizes = {i: flat_sizes(shapes) for i, shapes in self._shapes.items()}
        self.file = StateFile(directory, rank, [self._region_bytes(b.spec.index) for b in buckets],
                              threads=io_threads)
        biggest = {blk: max(s[blk] for s in self._sizes.values()) for blk in (False, True)}
        self._pinned: list[Tensor] = []
        self._sets: list[_Set] = []
        for _ in range(max(depth, 1)):
            bufs = {k: aligned_empty(biggest[self._per_block[k]], self._dtype[k]) for k in self.kinds}
            if pin and torch.cuda.is_available() and register(bufs["master"]):  # uploaded from: page-locked
                self._pinned.append(bufs["master"])
            self._sets.append(_Set(bufs))
        self.lookahead = max(depth - 1, 1)  # one set stays free for the write behind
        self._free: deque[_Set] = deque(self._sets)
        self._writing: deque[_Set] = deque()
        self._reading: dict[int, tuple[_Set, Future | None]] = {}
        self._held: dict[int, _Set] = {}
        self._order: deque[int] = deque()
        self._visit: tuple[int, bool] | None = None  # ``hold``'s resident bucket and whether it was changed
        self._lock = threading.RLock()

    # ---- pure layout --------------------------------------------------------------------------------
    def _region_bytes(self, b: int) -> list[int]:
        return [self._sizes[b][self._per_block[k]] * self._dtype[k].itemsize for k in self.kinds]

    def _views(self, b: int, s: _Set) -> dict[str, Tensor]:
        """Bucket ``b``'s flat buffers inside set ``s`` (a prefix of each of the set's buffers)."""
        return {k: s.buffers[k][: self._sizes[b][self._per_block[k]]] for k in self.kinds}

    @property
    def step_order(self) -> list[int]:
        """The order the pipeline steps NVMe buckets after the norm: forward order, last bucket index first."""
        return sorted(self.buckets, reverse=True)

    def nbytes(self) -> int:
        """Host bytes of the ring's buffer sets."""
        return sum(t.numel() * t.element_size() for s in self._sets for t in s.buffers.values())

    # ---- a step: reads ahead, writes behind ---------------------------------------------------------
    def begin(self, order: list[int] | None = None) -> None:
        """The next buckets to be acquired, in order (default: the step order); starts reading ahead."""
        with self._lock:
            assert not self._reading and not self._held, "a step or a hold is still in progress"
            self.drain()
            self._order = deque(self.step_order if order is None else order)
            self._refill()

    def acquire(self, b: int) -> None:
        """Wait until ``b``'s state is in a set, and bind its slots' ``state`` views to it."""
        with self._lock:
            if b not in self._reading:
                raise AssertionError(f"NVMe bucket {b} acquired out of order (reading {list(self._reading)})")
            s, fut = self._reading.pop(b)
            if fut is not None:
                fut.result()  # a HeavyliftError from the I/O thread (truncated file, drive error) surfaces here
            self._held[b] = s
            for slot, views in zip(self.buckets[b].slots, carve(self.buckets[b].fmt, self._shapes[b],
                                                                self._views(b, s)), strict=True):
                slot.state = views

    def release(self, b: int, dirty: bool, upload=None) -> None:
        """Done with ``b``: write it back if it changed, unbind its slots, read the next bucket ahead."""
        with self._lock:
            s = self._held.pop(b)
            for slot in self.buckets[b].slots:
                slot.state = {}
            s.upload = upload
            s.write = self.file.write(self.region[b], list(self._views(b, s).values())) if dirty else None
            self._writing.append(s)
            self._refill()

    def drain(self) -> None:
        """Wait for every write behind (and the uploads from those sets): the file is current after this."""
        with self._lock:
            while self._writing:
                s = self._writing.popleft()
                self._settle(s)
                self._free.append(s)

    def _refill(self) -> None:
        while self._order and len(self._reading) < self.lookahead:
            s = self._take_set()
            b = self._order.popleft()
            self._reading[b] = (s, self.file.read(self.region[b], list(self._views(b, s).values())))

    def _take_set(self) -> _Set:
        if not self._free:
            s = self._writing.popleft()  # the oldest write behind: most likely done already
            self._settle(s)
            return s
        return self._free.popleft()

    @staticmethod
    def _settle(s: _Set) -> None:
        if s.write is not None:
            s.write.result()
        if s.upload is not None:
            s.upload.synchronize()
        s.write = s.upload = None

    # ---- between steps: one tensor, or one bucket resident at a time --------------------------------
    def _span(self, b: int, i: int, kind: str) -> tuple[int, torch.Size]:
        """File offset and shape of slot ``i``'s ``kind`` tensor in bucket ``b``'s region (pure)."""
        k = self.kinds.index(kind)
        start = self.file.layout[self.region[b]][k][0]
        flat = {c: torch.empty(self._sizes[b][self._per_block[c]], dtype=self._dtype[c], device="meta")
                for c in self.kinds}
        view = carve(self.buckets[b].fmt, self._shapes[b], flat)[i][kind]
        return start + view.storage_offset() * view.element_size(), view.shape

    def read_tensor(self, b: int, i: int, kind: str) -> Tensor:
        """A fresh copy of one state tensor, read from the file alone (checkpoint saves: the bytes DCP asks
        for and no more)."""
        with self._lock:
            self.let_go()
            offset, shape = self._span(b, i, kind)
            t = torch.empty(shape, dtype=self._dtype[kind])
            self.file.read_at(offset, t.view(-1)).result()
            return t

    def write_tensor(self, b: int, i: int, kind: str, t: Tensor) -> None:
        """Write one state tensor (from ``read_tensor``, since changed) back to its place in the file."""
        with self._lock:
            offset, _ = self._span(b, i, kind)
            self.file.write_at(offset, t.contiguous().view(-1)).result()

    def hold(self, b: int, dirty: bool = False, fresh: bool = False) -> None:
        """Make ``b`` resident (its slots bound), first letting go of the bucket held before. ``dirty``: it
        will be changed, so it is written back when let go; ``fresh``: zeros instead of the file's bytes
        (its first write)."""
        with self._lock:
            if self._visit is not None and self._visit[0] == b:
                self._visit = (b, self._visit[1] or dirty)
                return
            self.let_go()
            self.drain()
            if fresh:
                s = self._take_set()
                for t in self._views(b, s).values():
                    t.zero_()
                self._reading[b] = (s, None)
            else:
                self.begin([b])
            self.acquire(b)
            self._visit = (b, dirty)

    def let_go(self) -> None:
        """Write back the bucket ``hold`` made resident, if it changed, and wait until the file has it."""
        with self._lock:
            if self._visit is not None:
                b, dirty = self._visit
                self._visit = None
                self.release(b, dirty)
            self.drain()

    def close(self) -> None:
        with self._lock:
            try:
                self.let_go()
            finally:
                for t in self._pinned:
                    release(t)
                self._pinned = []
                self.file.close()
