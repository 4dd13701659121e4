"""``torch.optim.Optimizer`` face of the offload engine, so schedulers and user code just work.

``param_groups`` hold the FSDP2 sharded parameters with their hyper-parameters (schedulers write
``lr`` here and the pipeline reads it per step); ``state`` maps each parameter to live views of its
fp32 master and moments, wherever they live (host store or GPU tail).
"""

from __future__ import annotations

from typing import Callable

import torch

from heavylift.offload.store import Slot


class OffloadedAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups: list[dict], slots: dict[int, Slot], step_fn: Callable[[], object]):
        defaults = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        super().__init__(param_groups, defaults)
        self._step_fn = step_fn
        for group in self.param_groups:
            for p in group["params"]:
                s = slots[id(p)]
                self.state[p] = {"step": s.step, "exp_avg": s.exp_avg, "exp_avg_sq": s.exp_avg_sq,
                                 "master": s.master}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim API
        if closure is not None:
            raise ValueError("heavylift's optimizer takes no closure: call engine.backward(loss) then engine.step()")
        return self._step_fn()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are consumed by the offload pipeline as they arrive; nothing is left to clear."""
