"""Gradient accumulation in the host slot (``offload.accumulate: host``).

With ``device`` accumulation FSDP2 adds each micro-batch's reduced gradient into the sharded ``.grad``,
so the card holds every parameter's gradient for the whole window (2 B/param with bf16 compute). With
``host`` a host bucket's gradients leave the card every micro-batch, as they do at the window's end::

    autograd thread              d2h stream                                        host slot (pinned)
    micro-batch 1 backward:
      hook(p): take p.grad,      g -> slot                                         slot = g1
      p.grad = None (its memory reused only after the d2h stream has read it)
    micro-batch k (1 < k < n):
      hook(p): take p.grad       slot -> up (H2D); up += g (on the GPU); up -> slot slot = g1 + ... + gk
    micro-batch n (the boundary): the pipeline's own dispatch asks ``total``:
                                 slot -> up; up += g; the norm's sum of squares
                                 from up; up -> slot; the CPU step as ever       slot = the window's sum

The addition is FSDP2's: it casts the reduce-scatter output to the parameter dtype and adds it to the
sharded gradient in that dtype, here ``up += g`` in the same dtype and order, so the result is bitwise
the device path's. That holds only where the slot has the gradient's dtype (the engine refuses host
accumulation otherwise). On the CPU (tests) the same additions run in place on the slot.

GPU-tail buckets keep accumulating on the card (their state is there anyway). A micro-batch's gradient is
let go as soon as its copies are queued: ``record_stream`` keeps the caching allocator from handing its
memory out before the d2h stream has read it, so the card holds at most one bucket's gradients in flight,
not the micro-batch's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from heavylift.offload.store import BucketState, Slot


@dataclass
class _Landing:
    """A host bucket's gradients of the current (non-final) micro-batch, as their hooks hand them over."""

    slots: list[int] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)


class HostAccumulator:
    def __init__(self, buckets: list[BucketState], device: torch.device, d2h: torch.cuda.Stream | None):
        self.buckets = buckets
        self.device = device
        self._d2h = d2h
        self._landing: dict[int, _Landing] = {}
        self._partial: set[tuple[int, int]] = set()  # (bucket, slot) whose host slot holds a partial sum
        self.link_bytes = 0  # both ways, for the pipeline's link counter

    # ---- micro-batches before the window's last -----------------------------------------------
    def take(self, b: int, i: int, grad: Tensor) -> None:
        """A host bucket's parameter ``i`` got this micro-batch's gradient (its local shard): kept until the
        bucket is complete, then sent. The caller drops ``.grad``."""
        landing = self._landing.setdefault(b, _Landing())
        landing.slots.append(i)
        landing.grads.append(grad)
        if len(landing.slots) == len(self.buckets[b].slots):
            self._send(b)

    def end_micro_batch(self) -> None:
        """After a non-final backward: send the buckets some of whose parameters got no gradient."""
        for b in list(self._landing):
            self._send(b)

    @torch.no_grad()
    def _send(self, b: int) -> None:
        landing = self._landing.pop(b)
        slots = self.buckets[b].slots
        if self._d2h is None:
            for i, g in zip(landing.slots, landing.grads):
                if (b, i) in self._partial:
                    slots[i].grad.add_(g)
                else:
                    slots[i].grad.copy_(g)
                self._partial.add((b, i))
            return
        self._d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._d2h):
            for i, g in zip(landing.slots, landing.grads):
                s = slots[i]
                g.record_stream(self._d2h)  # its memory is not reused before the d2h stream is done with it
                summed = self._added(b, i, s, g)  # allocated on the d2h stream: freed in its order
                s.grad.copy_(summed, non_blocking=True)
                self.link_bytes += s.grad.numel() * s.grad.element_size()
                self._partial.add((b, i))
        # nothing kept: the card lets this micro-batch's gradients go as soon as the copies have run

    # ---- the window's last micro-batch -----------------------------------------------------------
    def holds(self, b: int, i: int) -> bool:
        """Whether bucket ``b``'s slot ``i`` holds a partial sum of this window."""
        return (b, i) in self._partial

    def total(self, b: int, i: int, s: Slot, g: Tensor | None) -> Tensor:
        """The window's gradient of bucket ``b``'s slot ``i`` on the device: ``g`` plus the slot's partial
        sum where it holds one; ``g`` None (no gradient in the last micro-batch): the partial sum alone. On
        the current stream: the pipeline calls this inside its d2h stream."""
        summed = self._added(b, i, s, g)
        self._partial.discard((b, i))
        return summed

    def _added(self, b: int, i: int, s: Slot, g: Tensor | None) -> Tensor:
        if (b, i) not in self._partial:
            return g
        up = s.grad.to(self.device, non_blocking=True, copy=True)
        self.link_bytes += up.numel() * up.element_size()
        return up if g is None else up.add_(g)

    def reset(self) -> None:
        """Nothing held: after the window's last backward (whose dispatch took every partial sum, the
        pipeline's ``_take_earlier_sums`` included), or a checkpoint loaded part-way through a window."""
        self._landing.clear()
        self._partial.clear()

