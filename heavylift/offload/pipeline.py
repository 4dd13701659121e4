"""The bucket pipeline: gradients stream to the host during backward, a CPU worker steps each bucket
as soon as it lands, and the updated weights stream back, bucket by bucket.

Schedule of one optimizer step (the last micro-batch of an accumulation window)::

    autograd thread          FSDP post-reduce stream   d2h stream           CPU worker thread         h2d stream
    backward(block L-1) ---> reduce-scatter(L-1) ----> hook: d2h waits; g -> pinned slot
                                                        record ev_g[b] --> ev_g.sync; snapshot p,m,v
                                                                           AdamW(g) (speculative) --> master -> param
    backward(block L-2) ---> ...                                                                      record ev_p[b]
    ...                                                                    (buckets in arrival order)
    backward(root) --------> reduce-scatter(root) ---> tail buckets: g stays on the GPU
    step(): all-reduce sum(g^2) -> norm, finite?  (waits for no CPU bucket)
       commit (finite, norm <= clip):  speculative results stand
       clip   (norm > clip):           worker: restore snapshot, g *= c, AdamW, re-upload
       skip   (inf/NaN):               worker: restore snapshot, re-upload (state bit-identical)
       GPU tail: fused AdamW on the compute stream, master -> param
    next forward: pre-hook of unit u blocks until u's buckets are final and uploaded (per layer, not per step)

NVMe buckets (offload/nvme_ring.py draws their schedule) do not speculate: the worker reads their state
ahead into a ring of buffer sets from the start of the boundary backward, steps each one after the norm
in place in its set, uploads from there and writes it back behind.

The arithmetic of a bucket's step (which kernel, the scale and clip factors) is offload/bucket_step.py's;
the floor probes the benchmark runs on these buckets are offload/floor_probes.py's.

Only the autograd thread touches autograd, FSDP and ``.grad``; the worker touches host buffers, the
copy into the device shard on its own stream, and threading events. Every device tensor a side stream
reads stays referenced until that stream's event has completed, so the caching allocator never hands
its memory to someone else early.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from heavylift.config.errors import HeavyliftError
from heavylift.dist.cores import current_plan, pin_current_thread
from heavylift.dist.guard import guarded
from heavylift.offload.accumulate import HostAccumulator
from heavylift.offload.assist import MAX_SLOT_PARAMS, GpuAssist, assisted
from heavylift.offload.bucket_step import BucketStepper
from heavylift.offload.floor_probes import FloorProbes
from heavylift.offload.store import BucketState, Slot, flip, local_of, restore_snapshot, take_snapshot
from heavylift.optim.adamw import AdamWHyper, clip_coefficient, sum_of_squares


@dataclass
class StepResult:
    grad_norm: float
    clip_coef: float
    skipped: bool


@dataclass
class _Pending:
    """One bucket's share of the current optimizer step."""

    active: list[Slot] = field(default_factory=list)  # slots that received a gradient
    index: list[int] = field(default_factory=list)  # their indices in the bucket (host accumulation's keys)
    grads: list[Tensor] = field(default_factory=list)  # device grads, alive until copied
    dispatched: bool = False
    speculated: threading.Event = field(default_factory=threading.Event)
    spec_ok: bool = False  # the speculative step ran (its gradients were finite)
    sumsq: Tensor | None = None  # device, float32


class OffloadPipeline(FloorProbes):
    def __init__(
        self,
        buckets: list[BucketState],
        params_of: dict[int, tuple[int, int]],
        group_of_slot: Callable[[Slot], int],
        hypers: Callable[[int], AdamWHyper],
        device: torch.device,
        process_group: dist.ProcessGroup,
        speculate: bool,
        cpu_threads: int,
        native=None,
        ring=None,
        gpu_assist: float = 0.0,
        assist: bool = False,  # the assist's thread (config.schema.assist_wanted)
        host_accumulate: bool = False,  # offload.accumulate host (offload/accumulate.py)
    ):
        self.buckets = buckets
        self._params_of = params_of  # id(param) -> (bucket index, slot index)
        self._hypers = hypers
        self._groups = sorted({group_of_slot(s) for b in buckets for s in b.slots})
        self.device = device
        self._pg = process_group
        self.speculate = speculate
        self._native = native  # heavylift's CPU kernel module, or None: torch's fused kernel
        self._stepper = BucketStepper(group_of_slot, native)  # the math of a bucket's step
        self._double_buffered = native is not None and any(s.back is not None for b in buckets for s in b.slots)
        self._ring = ring  # offload.nvme_ring.NvmeRing of the NVMe buckets, or None
        self.gpu_assist = gpu_assist  # offload.gpu_assist: share of a non-speculative step's host buckets
        self._cuda = device.type == "cuda"
        self._d2h = torch.cuda.Stream(device) if self._cuda else None
        self._accumulator = HostAccumulator(buckets, device, self._d2h) if host_accumulate else None
        self._h2d = torch.cuda.Stream(device) if self._cuda else None
        self._upload_ev: list[torch.cuda.Event | None] = [None] * len(buckets)
        self._final = [threading.Event() for _ in buckets]
        for ev in self._final:
            ev.set()
        self._pending: list[_Pending] = [_Pending() for _ in buckets]
        # buckets, over the run; redo_assisted: redone buckets the assist stepped (counted in redone and assisted)
        self.stats = {"speculated": 0, "redone": 0, "undone": 0, "assisted": 0, "redo_assisted": 0}
        self.wait_seconds = 0.0  # autograd thread blocked in forward pre-hooks (exposed optimizer time)
        self.cpu_seconds, self.cpu_params = 0.0, 0  # CPU steps: their measured rate
        self._link_down = self._link_up = 0  # bytes copied device->host (autograd thread), host->device (worker)
        self._speculate_now = speculate
        self._last_committed = True
        self.boundary = False
        self.in_backward = False
        self.inv_scale = 1.0
        self._error: BaseException | None = None
        self._tasks: queue.Queue = queue.Queue()
        self._cpu_threads = cpu_threads
        self._worker = threading.Thread(target=self._work, name="heavylift-cpu-adamw", daemon=True)
        self._worker.start()
        self._assist = GpuAssist(self) if assist else None  # its share (gpu_assist) may be set later

    # ---- autograd thread: backward ------------------------------------------------------------
    def begin_boundary_backward(self, inv_scale: float) -> None:
        """Called before the backward of the last micro-batch of an optimizer step."""
        self._raise_worker_error()
        self.wait_all()
        self.inv_scale = inv_scale
        # Speculate only while it keeps paying: a clipped or skipped step costs a restore and a second
        # pass, so after one the next step waits for the norm instead (exact either way).
        self._speculate_now = self.speculate and self._last_committed
        # Frozen now: the scheduler moves on at the end of finish_step while the worker may still run.
        self._stepper.hypers = {g: self._hypers(g) for g in self._groups}
        self._pending = [_Pending() for _ in self.buckets]
        for ev in self._final:
            ev.clear()
        if self._ring is not None:
            self._tasks.put(("prefetch", -1, ()))  # NVMe reads overlap this backward

    @torch.no_grad()
    def on_grad(self, param: Tensor) -> None:
        """Post-accumulate-grad hook of every sharded parameter (fires right after its reduce-scatter)."""
        b, i = self._params_of[id(param)]
        if not self.boundary:
            if self._accumulator is not None and self.buckets[b].on_host:  # summed in the host slot
                self._accumulator.take(b, i, local_of(param.grad))
                param.grad = None
            return  # otherwise FSDP2 keeps summing into the sharded .grad
        bucket, pend = self.buckets[b], self._pending[b]
        pend.active.append(bucket.slots[i])
        pend.index.append(i)
        pend.grads.append(local_of(param.grad))
        param.grad = None
        if len(pend.active) == len(bucket.slots):
            self._dispatch(b)

    @torch.no_grad()
    def end_backward(self) -> None:
        """After every backward. The window's last: dispatch buckets some of whose parameters got no
        gradient this step. An earlier one, with host accumulation: send what it holds back."""
        if not self.boundary:
            if self._accumulator is not None:
                self._accumulator.end_micro_batch()
            return
        for b, pend in enumerate(self._pending):
            if not pend.dispatched:
                self._take_earlier_sums(b, pend)
                if pend.active:
                    self._dispatch(b)
        if self._accumulator is not None:
            self._accumulator.reset()

    def _take_earlier_sums(self, b: int, pend: _Pending) -> None:
        """Slots whose hook did not fire in the window's last backward but that got a gradient in an earlier
        micro-batch (a MoE expert no token of the last one picked): the window's sum is what FSDP2 kept in
        ``.grad`` (or the host slot's partial sum), and AdamW steps it, as torch's does."""
        got = set(pend.index)
        for i, s in enumerate(self.buckets[b].slots):
            if i in got or s.device_param is None:
                continue
            if s.device_param.grad is not None:
                pend.active.append(s)
                pend.index.append(i)
                pend.grads.append(local_of(s.device_param.grad))
                s.device_param.grad = None
            elif self._accumulator is not None and self._accumulator.holds(b, i):
                pend.active.append(s)
                pend.index.append(i)
                pend.grads.append(None)  # the sum is the slot's partial alone

    def _dispatch(self, b: int) -> None:
        bucket, pend = self.buckets[b], self._pending[b]
        pend.dispatched = True
        if not bucket.on_host:
            for s, g in zip(pend.active, pend.grads):
                s.grad.copy_(g)
            pend.sumsq = sum_of_squares([s.grad for s in pend.active])
            pend.grads = []
            return
        if self._cuda:
            self._d2h.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._d2h):
                kept: list[Tensor] = []  # this micro-batch's own gradients, read by the additions
                if self._accumulator is not None:  # the window's sum: the slot's partial + this micro-batch's
                    totals = self._window_totals(b, pend)
                    kept = [g for g, t in zip(pend.grads, totals) if g is not None and t is not g]
                    pend.grads = totals
                pend.sumsq = sum_of_squares(pend.grads)  # from the device gradients, before any cast
                # A slot of another dtype (bf16 slot, fp32 compute): cast on the GPU so only the slot's
                # bytes cross the link; the cast copies stay referenced with the grads until the copy ends.
                sent = [g if g.dtype == s.grad.dtype else g.to(s.grad.dtype) for s, g in zip(pend.active, pend.grads)]
                for s, g in zip(pend.active, sent):
                    s.grad.copy_(g, non_blocking=True)
                pend.grads = pend.grads + [g for g, orig in zip(sent, pend.grads) if g is not orig] + kept
                self._link_down += sum(g.numel() * g.element_size() for g in sent)
                host_sumsq = pend.sumsq.to("cpu", non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self._d2h)
        else:
            if self._accumulator is not None:
                pend.grads = self._window_totals(b, pend)
            for s, g in zip(pend.active, pend.grads):
                s.grad.copy_(g)
            pend.sumsq = sum_of_squares(pend.grads)
            host_sumsq, ev = pend.sumsq, None
        grads, pend.grads = pend.grads, []
        self._tasks.put(("land", b, (ev, grads, host_sumsq)))

    def drop_window(self) -> None:
        """Forget the current accumulation window's gradient sums, FSDP2's ``.grad`` and the host slots'
        partial sums (loading a checkpoint, which holds a step boundary, part-way through a window)."""
        for bucket in self.buckets:
            for s in bucket.slots:
                if s.device_param is not None:
                    s.device_param.grad = None
        if self._accumulator is not None:
            self._accumulator.reset()

    @contextlib.contextmanager
    def without_host_sums(self):
        """For the benchmark's forward+backward alone: micro-batch gradients are dropped, not summed on the host."""
        acc, self._accumulator = self._accumulator, None
        try:
            yield
        finally:
            self._accumulator = acc

    def _window_totals(self, b: int, pend: _Pending) -> list[Tensor | None]:
        """Host accumulation: each slot's gradient for the whole window, on the device (the current stream)."""
        return [self._accumulator.total(b, i, s, g) for i, s, g in zip(pend.index, pend.active, pend.grads)]

    # ---- autograd thread: validation and commit -----------------------------------------------
    @torch.no_grad()
    def finish_step(self, max_norm: float) -> StepResult:
        """Validate the speculative step; commit, redo clipped, or undo; step the GPU tail."""
        self._raise_worker_error()
        sums = [p.sumsq.to(self.device) for p in self._pending if p.sumsq is not None]
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._d2h)
        total = torch.stack(sums).sum() if sums else torch.zeros((), device=self.device)
        if dist.get_world_size(self._pg) > 1:
            with guarded("grad-norm all-reduce", self._pg, self.device):
                dist.all_reduce(total, group=self._pg)
        total_sq = float(total)
        found_inf = not math.isfinite(total_sq)
        norm = math.sqrt(total_sq) * self.inv_scale if not found_inf else float("inf")
        coef = 1.0 if found_inf else clip_coefficient(norm, max_norm)
        self._last_committed = not found_inf and coef == 1.0
        gpu = self._assisted_now(redo=not found_inf and coef != 1.0)
        # Forward order: the next forward needs the first layers first, so step those first.
        for b in reversed(range(len(self.buckets))):
            bucket, pend = self.buckets[b], self._pending[b]
            if not pend.dispatched and not bucket.nvme:
                self._final[b].set()
            elif b in gpu:
                self._assist.submit(b, found_inf, coef)
            elif bucket.on_host:  # NVMe buckets always: the ring reads them in this order
                self._tasks.put(("finish", b, (found_inf, coef)))
            else:
                if not found_inf:
                    self._stepper.step_slots(bucket, pend.active, self.inv_scale, coef)
                    for s in pend.active:
                        local_of(s.device_param).copy_(s.master)
                self._final[b].set()
        return StepResult(grad_norm=norm, clip_coef=coef, skipped=found_inf)

    @property
    def assisting(self) -> bool:
        """The GPU assist's thread exists (offload.gpu_assist > 0, or auto on a CUDA device)."""
        return self._assist is not None

    @property
    def redo_assisted(self) -> bool:
        """Whether a clipped step that speculated shares its redo with the GPU as a step that did not speculate
        shares its pass: with double buffers, speculation left each bucket's state untouched, so the assist
        steps it from there like any other (it waits for the speculative upload before writing the weights)."""
        return self._assist is not None and self._double_buffered

    def _assisted_now(self, redo: bool) -> set[int]:
        """The RAM buckets the GPU steps in this step (offload/assist.py): where the CPU's pass would otherwise
        start after the norm alone, in a step that did not speculate or (``redo``) a clipped one that did."""
        if self._assist is None or (self._speculate_now and not (redo and self.redo_assisted)):
            return set()
        ram = [b.spec.index for b in self.buckets if b.on_host and not b.nvme
               and max((p.numel for p in b.spec.params), default=0) <= MAX_SLOT_PARAMS]
        return assisted(ram, {b.spec.index: b.spec.numel for b in self.buckets}, self.gpu_assist)

    # ---- autograd thread: forward ---------------------------------------------------------------
    def wait_buckets(self, indices: list[int]) -> None:
        """Forward pre-hook body: block until these buckets hold their final weights on the device."""
        if self.in_backward:
            return  # activation-checkpoint recompute must see the pre-step weights, which it does
        t0 = time.perf_counter()
        self._wait(indices)
        self.wait_seconds += time.perf_counter() - t0

    def _wait(self, indices: list[int]) -> None:
        for b in indices:
            self._final[b].wait()
            self._raise_worker_error()
            ev = self._upload_ev[b]
            if ev is not None:
                ev.synchronize()

    def wait_all(self) -> None:
        self.wait_buckets(list(range(len(self.buckets))))

    def link_bytes(self) -> int:
        """Bytes that crossed the host link both ways so far (gradients down, weights up, and the assist's
        state and gradients both ways)."""
        return (self._link_down + self._link_up + (self._assist.link_bytes if self._assist is not None else 0)
                + (self._accumulator.link_bytes if self._accumulator is not None else 0))

    @property
    def cpu_threads(self) -> int:
        return self._cpu_threads

    @property
    def kernel(self) -> str:
        return "native" if self._native is not None else "torch"

    def close(self) -> None:
        self._tasks.put(None)
        self._worker.join(timeout=60)
        if self._assist is not None:
            self._assist.close()

    # ---- worker thread ----------------------------------------------------------------------------
    @torch.no_grad()
    def _work(self) -> None:
        plan = current_plan()
        if plan is not None and plan.how != "unbound":
            pin_current_thread(plan.worker_cpus)  # off the training thread's core
        if self._cpu_threads > 0:
            torch.set_num_threads(self._cpu_threads)
        if self._cuda:  # a new thread starts on GPU 0: its events and copies belong to this rank's
            torch.cuda.set_device(self.device)
        while True:
            task = self._tasks.get()
            if task is None:
                return
            kind, b, args = task
            try:
                if kind == "land":
                    self._land(b, *args)
                elif kind == "prefetch":
                    self._ring.begin()
                else:
                    self._finish(b, *args)
            except BaseException as exc:  # surfaced on the autograd thread at its next wait
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """A worker (CPU or assist) failed: keep the first cause and release every waiter."""
        self._error = self._error or exc  # the first is the cause; later tasks fail in its wake
        for ev in self._final:
            ev.set()
        for p in self._pending:
            p.speculated.set()

    def _land(self, b: int, ev, grads: list[Tensor], host_sumsq: Tensor) -> None:
        pend = self._pending[b]
        if ev is not None:
            ev.synchronize()
        grads.clear()  # the task's own list (the worker loop still holds it): its device memory goes now
        if self._speculate_now and not self.buckets[b].nvme and math.isfinite(float(host_sumsq)):
            self._wait_upload(b)
            with self._timed(pend.active):
                if self._double_buffered:
                    self._stepper.native_step(self.buckets[b].fmt, pend.active, self.inv_scale, into_back=True)
                else:  # torch's kernel, fp32 state only (the compact formats are always double-buffered)
                    take_snapshot(pend.active)
                    self._stepper.step_slots(self.buckets[b], pend.active, self.inv_scale, 1.0)
            self._upload(b, back=self._double_buffered)
            pend.spec_ok = True
            self.stats["speculated"] += 1
        pend.speculated.set()

    def _finish(self, b: int, found_inf: bool, coef: float) -> None:
        pend = self._pending[b]
        pend.speculated.wait()
        if self.buckets[b].nvme:
            self._finish_nvme(b, pend, found_inf, coef)
        elif self._double_buffered:
            self._finish_double_buffered(b, pend, found_inf, coef)
        elif pend.spec_ok:
            if found_inf or coef != 1.0:
                self.stats["undone" if found_inf else "redone"] += 1
                self._wait_upload(b)
                restore_snapshot(pend.active)
                if not found_inf:
                    # the restored moments see the clipped gradient; an fp32 slot was unscaled in place
                    # (as clip_grad_norm_ would), a bf16 slot is never written
                    unscaled = pend.active[0].grad.dtype == torch.float32
                    self._stepper.step_slots(self.buckets[b], pend.active, 1.0 if unscaled else self.inv_scale, coef)
                self._upload(b)
        elif not found_inf:
            self._step_after_norm(b, pend, coef)
        self._final[b].set()

    def _finish_double_buffered(self, b: int, pend: _Pending, found_inf: bool, coef: float) -> None:
        """The speculative step wrote the back buffers and left the state untouched: commit is a flip,
        a clip re-step rewrites the back buffers from the untouched state, a skip re-uploads the state."""
        if pend.spec_ok and not found_inf:
            if coef != 1.0:
                self.stats["redone"] += 1
                self._wait_upload(b)
                with self._timed(pend.active):
                    self._stepper.native_step(self.buckets[b].fmt, pend.active, self.inv_scale * coef, into_back=True)
                self._upload(b, back=True)
            flip(pend.active)
            for s in pend.active:
                s.step += 1
        elif pend.spec_ok:
            self.stats["undone"] += 1
            self._wait_upload(b)
            self._upload(b)
        elif not found_inf:
            self._step_after_norm(b, pend, coef)

    def _finish_nvme(self, b: int, pend: _Pending, found_inf: bool, coef: float) -> None:
        """An NVMe bucket steps in the ring set its state was read into, is uploaded from it and written
        back behind; skipped (or given no gradient), it is let go unwritten."""
        self._ring.acquire(b)
        stepped = pend.dispatched and bool(pend.active) and not found_inf
        if stepped:
            with self._timed(pend.active):
                # the kernel a RAM bucket uses in this step, so where the state lives changes no bit of the
                # result: the native one while speculating (double-buffered), else torch's
                if self._native is not None and self._speculate_now:
                    self._stepper.native_step(self.buckets[b].fmt, pend.active, self.inv_scale * coef, into_back=False)
                    for s in pend.active:
                        s.step += 1
                else:
                    self._stepper.step_slots(self.buckets[b], pend.active, self.inv_scale, coef)
            self._upload(b)
        self._ring.release(b, dirty=stepped, upload=self._upload_ev[b] if stepped else None)

    # ---- shared helpers -------------------------------------------------------------------------
    def _step_after_norm(self, b: int, pend: _Pending, coef: float) -> None:
        """A bucket that did not speculate steps once the norm is known: in place, then uploaded."""
        self._wait_upload(b)
        with self._timed(pend.active):
            self._stepper.step_slots(self.buckets[b], pend.active, self.inv_scale, coef)
        self._upload(b)

    @contextlib.contextmanager
    def _timed(self, slots: list[Slot]):
        """Count a CPU step's seconds and parameters: the kernel's rate as the worker really runs it
        (mid-backward, beside the next forward), which the automatic placement plans with."""
        t0 = time.perf_counter()
        yield
        self.cpu_seconds += time.perf_counter() - t0
        self.cpu_params += sum(s.grad.numel() for s in slots)

    def _upload(self, b: int, back: bool = False) -> None:
        slots = self.buckets[b].slots
        if back:
            pend = self._pending[b]
            sources = {id(s): s.back["master"] for s in pend.active}
            src = [sources.get(id(s), s.master) for s in slots]
        else:
            src = [s.master for s in slots]
        if not self._cuda:
            for s, t in zip(slots, src):
                local_of(s.device_param).copy_(t)
            return
        self._link_up += sum(t.numel() * t.element_size() for t in src)
        with torch.cuda.stream(self._h2d):
            for s, t in zip(slots, src):
                local_of(s.device_param).copy_(t, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._h2d)
        self._upload_ev[b] = ev

    def _wait_upload(self, b: int) -> None:
        """The master buffer may be rewritten only once the last copy out of it has completed."""
        ev = self._upload_ev[b]
        if ev is not None:
            ev.synchronize()

    def _raise_worker_error(self) -> None:
        if isinstance(self._error, HeavyliftError):  # a user-facing cause (the NVMe drive): its own line
            raise self._error
        if self._error is not None:
            raise RuntimeError("heavylift CPU optimizer worker failed") from self._error

