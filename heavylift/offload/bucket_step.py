"""The math of one bucket's AdamW step, apart from the pipeline's threads and streams (offload/pipeline.py):
which kernel steps which state, how the loss scale and the clip coefficient reach the gradient, and the
step counters. Pure arithmetic on the slots it is handed; the caller decides when and on which thread."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from heavylift.offload.store import BucketState, Slot
from heavylift.optim.adamw import AdamWHyper, adamw_step_
from heavylift.optim.compact import STEPS as TORCH_COMPACT_STEPS
from heavylift.optim.formats import StateFormat, native_step


class BucketStepper:
    """Steps slots with heavylift's native kernel (``native``: its module, or None) or torch's fused one.
    ``hypers`` holds the step's hyper-parameters per group, frozen by the pipeline at the boundary."""

    def __init__(self, group_of_slot: Callable[[Slot], int], native=None):
        self.group_of_slot = group_of_slot
        self.native = native
        self.hypers: dict[int, AdamWHyper] = {}
        self._widen: Tensor | None = None  # torch's kernel: the fp32 copy of a host bf16 gradient

    def native_step(self, fmt: StateFormat, slots: list[Slot], grad_mul: float, into_back: bool) -> None:
        """heavylift's out-of-place kernel: reads the state, writes the back buffers (or in place);
        step counters advance only on commit."""
        for s in slots:
            hp = self.hypers[self.group_of_slot(s)]
            dst = s.back if into_back else s.state
            native_step(self.native, fmt, s.state, dst, s.grad, hp, int(s.step) + 1, grad_mul, s.row_len, s.sr)

    def step_slots(self, bucket: BucketState, slots: list[Slot], inv_scale: float, coef: float,
                   counts: list[int] | None = None) -> None:
        """Unscale, clip (in place, as clip_grad_norm_ does, for fp32 state; inside the step for the
        others) and AdamW-step the given slots of ``bucket``. ``counts``: the slots' step counts where the
        caller knows them (a GPU tail in a compact format otherwise reads them back from the device)."""
        if bucket.fmt.name != "fp32":
            if bucket.on_host:  # the compact formats need heavylift's CPU kernel
                self.native_step(bucket.fmt, slots, inv_scale * coef, into_back=False)
            else:  # GPU tail in a compact format: the same math in torch ops
                step = TORCH_COMPACT_STEPS[bucket.fmt.name]
                if counts is None:
                    counts = torch.stack([s.step for s in slots]).tolist() if slots else []  # one sync
                for s, n in zip(slots, counts):
                    hp = self.hypers[self.group_of_slot(s)]
                    step(s.state, s.state, s.grad, hp, int(n) + 1, inv_scale * coef, s.row_len)
            for s in slots:
                s.step += 1
            return
        if slots and slots[0].grad.dtype != torch.float32:
            self._torch_step_widened(slots, inv_scale, coef)
            return
        grads = [s.grad for s in slots]
        if inv_scale != 1.0:
            torch._foreach_mul_(grads, inv_scale)
        if coef != 1.0:
            torch._foreach_mul_(grads, coef)
        by_group: dict[int, list[Slot]] = {}
        for s in slots:
            by_group.setdefault(self.group_of_slot(s), []).append(s)
        for g, ss in by_group.items():
            adamw_step_([s.master for s in ss], [s.grad for s in ss], [s.exp_avg for s in ss],
                        [s.exp_avg_sq for s in ss], [s.step for s in ss], self.hypers[g])

    def _torch_step_widened(self, slots: list[Slot], inv_scale: float, coef: float) -> None:
        """torch's fused kernel wants an fp32 gradient: a bf16 slot is widened one parameter at a time
        (never a bucket-sized temporary) and scaled there, the same multiplies in the same order as the
        fp32 slot's in-place ones; the slot itself is left as it was (a clip redo reads it again). The fp32
        copy of a host slot lives in one scratch buffer (worker thread only), reused across parameters and
        steps: a fresh one per parameter page-faults its memory in every time, 4-6x slower on a 2-core box
        (200 M params: 1.0-1.3 s against 0.18-0.32 s). A GPU tail's copy comes from the caching allocator."""
        if not slots:
            return
        host = slots[0].grad.device.type == "cpu"
        need = max(s.grad.numel() for s in slots)
        if host and (self._widen is None or self._widen.numel() < need):
            self._widen = torch.empty(need, dtype=torch.float32)
        for s in slots:
            g = self._widen[: s.grad.numel()].view_as(s.grad).copy_(s.grad) if host else s.grad.to(torch.float32)
            if inv_scale != 1.0:
                g.mul_(inv_scale)
            if coef != 1.0:
                g.mul_(coef)
            adamw_step_([s.master], [g], [s.exp_avg], [s.exp_avg_sq], [s.step],
                        self.hypers[self.group_of_slot(s)])
