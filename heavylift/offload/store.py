"""The state store: master weights, Adam moments and gradient slots for each rank's shards.

One flat buffer per bucket and per kind of state (the kinds and dtypes are the state format's,
optim/formats.py), with a per-parameter view into each. Host buckets keep the buffers a transfer
touches (gradient slot: GPU->host; master: host->GPU) in pinned memory; the moments and the speculation
snapshot never cross the link and stay pageable. GPU-tail buckets keep all their state on the device,
in the format's tail format. Nothing here launches work; ``offload.pipeline`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from heavylift.offload.buckets import BucketSpec, ParamSpec
from heavylift.offload.pinned import pinned_zeros, release
from heavylift.optim.compact import split_bf16
from heavylift.optim.formats import FORMATS, StateFormat
from heavylift.optim.quant import rows_and_len, scale_shape


@dataclass
class Slot:
    """One parameter shard: its device tensor and its views into the bucket's state buffers."""

    spec: ParamSpec
    state: dict[str, Tensor]  # the format's kinds (master, exp_avg, ...) -> live views; {} for an NVMe bucket
    # that is not resident in a ring buffer set
    grad: Tensor
    step: Tensor  # float32 0-d, on the state's device
    row_len: int = 1  # elements per row of the shard (quantization blocks follow rows)
    # a stochastically rounded master's random bits (optim/stochastic.py): the parameter's stream key and the
    # global index of the shard's first element
    sr: tuple[int, int] = (0, 0)
    snap: dict[str, Tensor] | None = None  # the state before the step
    back: dict[str, Tensor] | None = None  # double buffer: where the next step writes
    snap_step: float = 0.0
    device_param: Tensor | None = None  # the FSDP2 sharded parameter; ``local_of`` gives its shard

    @property
    def master(self) -> Tensor:
        return self.state["master"]

    @property
    def exp_avg(self) -> Tensor:
        return self.state["exp_avg"]

    @property
    def exp_avg_sq(self) -> Tensor:
        return self.state["exp_avg_sq"]


@dataclass
class BucketState:
    spec: BucketSpec
    state_device: torch.device
    fmt: StateFormat
    tail: bool = False  # GPU tail: state on the compute device, stepped there after validation
    nvme: bool = False  # host bucket whose state lives in the NVMe state file (slots bound only while resident)
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
    fmt: StateFormat = FORMATS["fp32"],
    grad_dtype: torch.dtype = torch.float32,
    nvme: bool = False,
    pin_all: bool = False,
) -> BucketState:
    """Allocate a bucket's flat buffers and carve one view per parameter (shaped like its shard; per-block
    scales ``rows x blocks``).

    A tail bucket lives on ``state_device`` (the compute device; the CPU in CPU-only runs and tests)
    in ``fmt``'s tail format; a host bucket on the CPU, its transfer buffers pinned when ``pin``, its
    gradient slot in ``grad_dtype`` (offload.grad_slot; a tail's slot is fp32: torch's fused kernel
    steps it and wants the master's dtype)."""
    on_host = not tail
    if on_host:
        state_device = torch.device("cpu")
    else:
        fmt = FORMATS[fmt.tail]
    sizes = flat_sizes(shapes)

    def buf(per_block: bool, dtype: torch.dtype, pinned: bool = False, fallback: bool = True) -> Tensor:
        if pinned and on_host:
            return pinned_zeros(sizes[per_block], dtype, fallback)
        return torch.zeros(sizes[per_block], dtype=dtype, device=state_device)

    # "": the state; "snap_": its copy before a speculative step (torch kernel); "back_": the second set a
    # speculative step writes (native kernel), uploaded from, so its master is pinned too. An NVMe bucket
    # keeps only its gradient slot here: its state lives in the state file and is bound to a ring buffer
    # set while it is stepped (offload/nvme_ring.py).
    prefixes = [] if nvme else [""] + ["snap_"] * (snapshot and on_host) + ["back_"] * (double_buffer and on_host)
    # pinned: what crosses the link (the master, the gradient slot); every state buffer with ``pin_all``
    # (offload.gpu_assist sends a host bucket's whole state up and back)
    # (a buffer pinned for the assist alone stays pageable where the driver refuses to lock it: slower copies,
    # not torch's pinned allocator's power-of-two rounding)
    flats = {prefix + b.kind: buf(b.per_block, b.dtype, pin and (b.link or pin_all) and prefix != "snap_", b.link)
             for prefix in prefixes for b in fmt.buffers}
    flats["grad"] = buf(False, grad_dtype if on_host else torch.float32, pin)
    bucket = BucketState(spec, state_device, fmt, tail=tail, nvme=nvme, flats=flats)

    def views(prefix: str) -> list[dict[str, Tensor]]:
        return carve(fmt, shapes, {k: flats[prefix + k] for k in fmt.kinds})

    state, snap, back = (views(x) if x in prefixes else [None] * len(shapes) for x in ("", "snap_", "back_"))
    off = 0
    for p, shape, st, sn, bk in zip(spec.params, shapes, state, snap, back, strict=True):
        bucket.slots.append(Slot(
            spec=p, state=st if st is not None else {}, grad=flats["grad"][off: off + p.numel].view(shape),
            step=torch.zeros((), dtype=torch.float32, device=state_device), row_len=max(rows_and_len(shape)[1], 1),
            snap=sn, back=bk,
        ))
        off += p.numel
    return bucket


def flat_sizes(shapes: list[torch.Size]) -> dict[bool, int]:
    """Elements of a bucket's flat buffers: per-element (False) and per-block (True, quantization scales)."""
    return {False: sum(math.prod(s) for s in shapes), True: sum(math.prod(scale_shape(s)) for s in shapes)}


def carve(fmt: StateFormat, shapes: list[torch.Size], flats: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Per-parameter views into a bucket's flat state buffers (one per kind): each shaped like its shard,
    per-block scales ``rows x blocks``."""
    per_block = {b.kind: b.per_block for b in fmt.buffers}
    out, off = [], {False: 0, True: 0}
    for shape in shapes:
        n = {False: math.prod(shape), True: math.prod(scale_shape(shape))}
        out.append({kind: flats[kind][off[per_block[kind]]: off[per_block[kind]] + n[per_block[kind]]]
                    .view(scale_shape(shape) if per_block[kind] else shape) for kind in fmt.kinds})
        off = {blk: off[blk] + n[blk] for blk in off}
    return out


SPLIT_CHUNK = 1 << 24  # elements split at a time: ~160 MB of temporaries, whatever the tensor's size


def write_master(slot: Slot, value: Tensor) -> None:
    """Set the master weight from fp32 values (a bf16 master keeps the rounding residual too).

    The pair is split in chunks: whole, a 778 M-element embedding's split held 2.5x its fp32 size in
    temporaries (7.3 GiB for qwen3-14b's), the 6 GiB a bf16-master run peaked above its plan at init."""
    if "master_comp" not in slot.state:
        slot.state["master"].copy_(value)
        return
    flat, hi_dst, lo_dst = value.reshape(-1), slot.state["master"].view(-1), slot.state["master_comp"].view(-1)
    for start in range(0, flat.numel(), SPLIT_CHUNK):
        hi, lo = split_bf16(flat[start: start + SPLIT_CHUNK])
        hi_dst[start: start + SPLIT_CHUNK].copy_(hi)
        lo_dst[start: start + SPLIT_CHUNK].copy_(lo)


def local_of(t: Tensor) -> Tensor:
    """The rank-local tensor behind an FSDP2 (DTensor) parameter or gradient."""
    return t.to_local() if hasattr(t, "to_local") else t


def take_snapshot(slots: list[Slot]) -> None:
    for s in slots:
        assert s.snap is not None
        for kind, t in s.state.items():
            s.snap[kind].copy_(t)
        s.snap_step = float(s.step)


def flip(slots: list[Slot]) -> None:
    """Double buffer: the buffers the step wrote become the state; the old state becomes the back."""
    for s in slots:
        assert s.back is not None
        s.state, s.back = s.back, s.state


def restore_snapshot(slots: list[Slot]) -> None:
    for s in slots:
        assert s.snap is not None
        for kind, t in s.state.items():
            t.copy_(s.snap[kind])
        s.step.fill_(s.snap_step)


@torch.no_grad()
def migrate_to_tail(bucket: BucketState, device: torch.device) -> BucketState:
    """A copy of a host bucket whose state lives on ``device`` and steps there (the GPU tail).

    Master, moments and step counts are copied exactly (bf16 moments widen to the fp32 tail's; the
    compact formats keep their own form on the tail); the speculation snapshot is not needed on the
    tail (it steps after validation). The caller drops the host bucket, releasing its memory."""
    shapes = [s.grad.shape for s in bucket.slots]
    moved = allocate_bucket(bucket.spec, shapes, device, pin=False, snapshot=False, tail=True, fmt=bucket.fmt)
    for old, new in zip(bucket.slots, moved.slots, strict=True):
        for kind, t in new.state.items():
            t.copy_(old.state[kind])
        new.step.copy_(old.step)
        new.device_param = old.device_param
    return moved
