"""GPU assist: after the norm, part of the host buckets step on the GPU while the CPU steps the rest.

A step that did not speculate (it clipped last time, speculation is off, or its second buffer set did not
fit) can only start its host buckets' AdamW once the global norm is known, after the last backward. A step
that speculated and clipped must redo that pass after the norm too. With double buffers (the native kernel)
its state is still the step's input, so the assist takes its share of the redo the same way (its weights
are written after the speculative upload has landed; those buckets then take the road that did not
speculate, torch's AdamW for fp32, rather than the native redo). The
CPU then steps every host bucket in forward order and the next forward follows it layer by layer: the
part of that pass the forward cannot hide is exposed (session 4, qwen3-14b on one H200: 2.3 s of a
5.1 s step). With ``offload.gpu_assist`` f > 0, a fixed, interleaved share f of those buckets (by
parameters, every k-th in forward order) takes another road: its state and gradient go up the link, the
GPU tail's arithmetic steps it, the new master lands in the device parameter and the state goes back down.
The CPU and the link then work on the same pass at once::

    autograd thread   finish_step: norm ------------------------------------------> next forward (per layer)
    CPU worker                     step b0 ---> step b2 ---> step b3 ---> step b5 ...   (upload each)
    assist thread                  b1: slot by slot   up: state+grad h2d | step | param write
                                                          down:        (after up) state d2h   b4: ...

Choosing f: with N host params, the CPU's rate R (params/s), the link's B (bytes/s each way), a format's
state bytes S, gradient slot g and upload u per param, the CPU takes (1-f)N/R and the link up
(f(S+g) + (1-f)u)N/B (down, fSN/B, is smaller); they balance at f = (B/R - u) / (B/R - u + S + g). With B
= 50 GB/s and R = 3.5 G params/s that is 0.42 for fp32 (S 12, g 2, u 4) and 0.56 for int8-moments (S ~6),
for a pass 1.7x and 2.3x shorter than the CPU's alone. ``auto`` (the default, offload/assist_share.py) sets
f from the two rates measured in the first steps (0.42 and 0.45 on one H200 box, session 7).

A bucket's result depends on which road it took only through the kernel: fp32 state steps in torch's
fused AdamW on either road (the same arithmetic; bitwise equal where the device is the CPU, as in the
tests); int8-moments and bf16-master step in their torch ops on the GPU, as the GPU tail does, against the
native kernel on the CPU (both within the format's bound of the float64 reference). The assignment is a
function of the host buckets alone, so a resumed run assigns alike. Its gradient and state cross the link
per parameter (one slot at a time; a bucket with a slot over MAX_SLOT_PARAMS stays on the CPU). With
gpu_assist on, every host state buffer is pinned at init (the preflight counts it), not only the master.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading

import torch

from heavylift.offload.bucket_step import BucketStepper
from heavylift.offload.store import BucketState, Slot, local_of

# A bucket with a larger slot stays on the CPU road: about two slots' device copies (state, gradient and its
# fp32 widening: <= 18 B/param, 2.3 GB a slot at this size) must fit inside the placement's margin of the
# card (10% + 2 GiB, offload/tail.py), which the planner does not otherwise spend on this.
MAX_SLOT_PARAMS = 128 * 2**20


def assisted(host_buckets: list[int], sizes: dict[int, int], fraction: float) -> set[int]:
    """The buckets (indices; forward order is descending index) the GPU steps: walking in forward order,
    a bucket is taken whenever that brings the assisted parameters closer to ``fraction`` of those seen so
    far, so the two roads interleave (0.5 with equal buckets: every second one, the first on the CPU); pure."""
    chosen: set[int] = set()
    if fraction <= 0:
        return chosen
    seen = taken = 0
    for b in sorted(host_buckets, reverse=True):
        seen += sizes[b]
        if taken + sizes[b] / 2 < fraction * seen:
            chosen.add(b)
            taken += sizes[b]
    return chosen


class GpuAssist:
    """The assist thread of one pipeline: ``submit`` in forward order; each bucket is stepped on the
    device (``run``), then its ``_final`` event is set, as the CPU worker does for its own."""

    def __init__(self, pipeline):
        self.p = pipeline
        self.cuda = pipeline.device.type == "cuda"
        # its own stepper: the CPU worker's keeps a scratch buffer that only one thread may use
        self.stepper = BucketStepper(pipeline._stepper.group_of_slot, pipeline._stepper.native)
        # up: copies up, the step and the parameter write; down: the state's copies back, so a slot's
        # download overlaps the next one's upload (two copy engines)
        self.up = torch.cuda.Stream(pipeline.device) if self.cuda else None
        self.down = torch.cuda.Stream(pipeline.device) if self.cuda else None
        self.link_bytes = 0  # state and gradients up, state down (this thread's count)
        self._tasks: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="heavylift-gpu-assist", daemon=True)
        self._thread.start()

    def submit(self, b: int, found_inf: bool, coef: float) -> None:
        self._tasks.put((b, found_inf, coef))

    def close(self) -> None:
        self._tasks.put(None)
        self._thread.join(timeout=60)

    @torch.no_grad()
    def _work(self) -> None:
        if self.cuda:  # a new thread starts on GPU 0
            torch.cuda.set_device(self.p.device)
        while (task := self._tasks.get()) is not None:
            b, found_inf, coef = task
            try:
                if self.p._error is None:  # after a failure the step is void: its waiters are released
                    self.run(b, found_inf, coef)
            except BaseException as exc:  # surfaced on the autograd thread at its next wait
                self.p._fail(exc)
            finally:
                self.p._final[b].set()

    def run(self, b: int, found_inf: bool, coef: float) -> None:
        """Step bucket ``b`` on the device, one slot at a time: on ``up``, its state, gradient and step
        count go up, the tail's arithmetic steps them and the master is written into the device parameter;
        on ``down``, once that is done, the state comes back. The event recorded on ``down`` after the last
        slot (``pipeline._upload_ev[b]``) stands for "the parameter is final" and "the host state is current"
        alike; it is recorded even when a slot fails, so nothing waits on copies it cannot see. A slot's
        device copies are released to the caching allocator once ``down`` has read them (record_stream): about
        two slots' copies are alive at a time."""
        p = self.p
        pend, bucket = p._pending[b], p.buckets[b]
        pend.speculated.wait()  # the CPU worker has seen its gradient land in the host slot
        p._wait_upload(b)
        if found_inf or not pend.active:
            return
        self.stepper.hypers = p._stepper.hypers  # this step's, frozen at the boundary
        try:
            for s in pend.active:
                self._slot(s, bucket, p.inv_scale, coef)
        finally:
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(self.down)
                p._upload_ev[b] = ev
        p.stats["assisted"] += 1
        if pend.spec_ok:  # a clipped speculated step's redo, taken over from the CPU
            p.stats["redone"] += 1
            p.stats["redo_assisted"] += 1

    def _slot(self, s: Slot, bucket: BucketState, inv_scale: float, coef: float) -> None:
        count = int(s.step)  # the host's count: no read-back from the device, which would wait
        with torch.cuda.stream(self.up) if self.cuda else contextlib.nullcontext():
            dev = _up(s, self.p.device, count)
            self.stepper.step_slots(_DEVICE_BUCKET[bucket.fmt.name], [dev], inv_scale, coef, counts=[count])
            local_of(s.device_param).copy_(dev.state["master"], non_blocking=self.cuda)
        if self.cuda:
            self.down.wait_stream(self.up)
        with torch.cuda.stream(self.down) if self.cuda else contextlib.nullcontext():
            for k, t in s.state.items():
                t.copy_(dev.state[k], non_blocking=self.cuda)
                if self.cuda:
                    dev.state[k].record_stream(self.down)
        s.step += 1
        state = sum(t.numel() * t.element_size() for t in s.state.values())
        self.link_bytes += 2 * state + s.grad.numel() * s.grad.element_size()


def _up(s: Slot, device: torch.device, count: int) -> Slot:
    """A device copy of the slot: its state and gradient (copied up on the current stream) and its step
    count (a fill, not a copy from pageable memory, which would wait for the stream); the same row length and
    spec, so the quantization blocks and the hyper-parameters are the host's."""
    cuda = device.type == "cuda"
    state = {k: t.to(device, non_blocking=cuda, copy=True) for k, t in s.state.items()}
    return dataclasses.replace(s, state=state, grad=s.grad.to(device, non_blocking=cuda, copy=True),
                               step=torch.full((), float(count), dtype=torch.float32, device=device),
                               snap=None, back=None)


@dataclasses.dataclass
class _DeviceBucket:
    """What ``BucketStepper.step_slots`` reads of a bucket: its format and that it is not on the host
    (so the compact formats take their torch ops, as the GPU tail does)."""

    fmt: object
    on_host: bool = False


def _device_buckets() -> dict[str, _DeviceBucket]:
    from heavylift.optim.formats import FORMATS, SELF_TAILED

    return {name: _DeviceBucket(FORMATS[name]) for name in SELF_TAILED}


_DEVICE_BUCKET = _device_buckets()
