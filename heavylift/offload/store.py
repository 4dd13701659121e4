"""The state store: fp32 master weights, Adam moments and gradient slots for each rank's shards.

One flat buffer per bucket and per kind of state, with a per-parameter view into each. Host buckets
keep the buffers a transfer touches (gradient slot: GPU->host; master: host->GPU) in pinned memory;
the moments and the speculation snapshot never cross the link and stay pageable. GPU-tail buckets keep
all their state on the device. Nothing here launches work; ``offload.pipeline`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from heavylift.offload.buckets import BucketSpec, ParamSpec
from heavylift.offload.pinned import pinned_zeros, release


@dataclass
class Slot:
    """One parameter shard: its device tensor and its views into the bucket's state buffers."""

    spec: ParamSpec
    master: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    grad: Tensor
    step: Tensor  # float32 0-d, on the state's device
    snap: tuple[Tensor, Tensor, Tensor] | None = None  # master, exp_avg, exp_avg_sq before the step
    back: tuple[Tensor, Tensor, Tensor] | None = None  # double buffer: where the next step writes
    snap_step: float = 0.0
    device_param: Tensor | None = None  # the FSDP2 sharded parameter; ``local_of`` gives its shard


@dataclass
class BucketState:
    spec: BucketSpec
    state_device: torch.device
    tail: bool = False  # GPU tail: state on the compute device, stepped there after validation
    slots: list[Slot] = field(default_factory=list)
    flats: dict[str, Tensor] = field(default_factory=dict)

    @property
    def on_host(self) -> bool:
        return not self.tail

    def release(self) -> None:
        """Unlock pinned buffers; call before dropping a host bucket."""
        for t in self.flats.values():
            release(t)

    def nbytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k, t in self.flats.items():
            out[k] = t.numel() * t.element_size()
        return out


def allocate_bucket(
    spec: BucketSpec,
    shapes: list[torch.Size],
    state_device: torch.device,
    pin: bool,
    snapshot: bool,
    tail: bool = False,
    double_buffer: bool = False,
    moment_dtype: torch.dtype = torch.float32,
) -> BucketState:
    """Allocate a bucket's flat buffers and carve one view per parameter (shaped like its shard).

    A tail bucket lives on ``state_device`` (the compute device; the CPU in CPU-only runs and tests);
    a host bucket on the CPU, its transfer buffers pinned when ``pin``."""
    n = spec.numel
    on_host = not tail
    if on_host:
        state_device = torch.device("cpu")

    def buf(pinned: bool, dtype: torch.dtype = torch.float32) -> Tensor:
        if pinned and on_host:
            return pinned_zeros(n)
        return torch.zeros(n, dtype=dtype, device=state_device)

    mdt = moment_dtype if on_host else torch.float32  # the GPU tail keeps fp32 moments
    flats = {
        "master": buf(pin),
        "exp_avg": buf(False, mdt),
        "exp_avg_sq": buf(False, mdt),
        "grad": buf(pin),
    }
    if snapshot and on_host:
        flats.update(snap_master=buf(False), snap_exp_avg=buf(False, mdt), snap_exp_avg_sq=buf(False, mdt))
    if double_buffer and on_host:
        flats.update(master_b=buf(pin), exp_avg_b=buf(False, mdt), exp_avg_sq_b=buf(False, mdt))
    bucket = BucketState(spec, state_device, tail=tail, flats=flats)
    off = 0
    for p, shape in zip(spec.params, shapes, strict=True):

        def view(key: str) -> Tensor:
            return flats[key][off: off + p.numel].view(shape)

        snap = (view("snap_master"), view("snap_exp_avg"), view("snap_exp_avg_sq")) if "snap_master" in flats else None
        back = (view("master_b"), view("exp_avg_b"), view("exp_avg_sq_b")) if "master_b" in flats else None
        bucket.slots.append(Slot(
            spec=p, master=view("master"), exp_avg=view("exp_avg"),
            exp_avg_sq=view("exp_avg_sq"), grad=view("grad"), step=torch.zeros((), dtype=torch.float32, device=state_device), snap=snap, back=back,
        ))
        off += p.numel
    return bucket


def local_of(t: Tensor) -> Tensor:
    """The rank-local tensor behind an FSDP2 (DTensor) parameter or gradient."""
    return t.to_local() if hasattr(t, "to_local") else t


def take_snapshot(slots: list[Slot]) -> None:
    for s in slots:
        assert s.snap is not None
        s.snap[0].copy_(s.master)
        s.snap[1].copy_(s.exp_avg)
        s.snap[2].copy_(s.exp_avg_sq)
        s.snap_step = float(s.step)


def flip(slots: list[Slot]) -> None:
    """Double buffer: the buffers the step wrote become the state; the old state becomes the back."""
    for s in slots:
        assert s.back is not None
        front = (s.master, s.exp_avg, s.exp_avg_sq)
        s.master, s.exp_avg, s.exp_avg_sq = s.back
        s.back = front


def restore_snapshot(slots: list[Slot]) -> None:
    for s in slots:
        assert s.snap is not None
        s.master.copy_(s.snap[0])
        s.exp_avg.copy_(s.snap[1])
        s.exp_avg_sq.copy_(s.snap[2])
        s.step.fill_(s.snap_step)


@torch.no_grad()
def migrate_to_tail(bucket: BucketState, device: torch.device) -> BucketState:
    """A copy of a host bucket whose state lives on ``device`` and steps there (the GPU tail).

    Master, moments and step counts are copied exactly; the speculation snapshot is not needed on the
    tail (it steps after validation). The caller drops the host bucket, releasing its memory."""
    shapes = [s.master.shape for s in bucket.slots]
    moved = allocate_bucket(bucket.spec, shapes, device, pin=False, snapshot=False, tail=True)
    for old, new in zip(bucket.slots, moved.slots, strict=True):
        new.master.copy_(old.master)
        new.exp_avg.copy_(old.exp_avg)
        new.exp_avg_sq.copy_(old.exp_avg_sq)
        new.step.copy_(old.step)
        new.device_param = old.device_param
    return moved
