"""``torch.optim.Optimizer`` face of the offload engine, so schedulers and user code just work.

``param_groups`` hold the FSDP2 sharded parameters with their hyper-parameters (schedulers write
``lr`` here and the pipeline reads it per step); ``state`` maps each parameter to live views of its
master and moments, wherever they live (host store or GPU tail), in the state format's own form
(optim/formats.py: e.g. int8 codes and their scales, or a bf16 master and its compensation).
"""

from __future__ import annotations

from typing import Callable

import torch

from heavylift.offload.store import Slot


class OffloadedAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups: list[dict], slots: dict[int, Slot], step_fn: Callable[[], object],
                 settle: Callable[[], None] = lambda: None):
        defaults = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        super().__init__(param_groups, defaults)
        self._step_fn = step_fn
        self._slots = slots
        self._settle = settle  # waits for the CPU worker, so the views below are final
        self.sync_state()

    def sync_state(self) -> None:
        """Point ``state`` at the current buffers (double buffering swaps them on every commit, and
        the GPU tail may move a bucket to the device)."""
        for group in self.param_groups:
            for p in group["params"]:
                s = self._slots[id(p)]
                self.state[p] = {"step": s.step, **s.state}

    def state_dict(self):
        self._settle()
        self.sync_state()
        return super().state_dict()

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim API
        if closure is not None:
            raise ValueError("heavylift's optimizer takes no closure: call engine.backward(loss) then engine.step()")
        return self._step_fn()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are consumed by the offload pipeline as they arrive; nothing is left to clear."""
