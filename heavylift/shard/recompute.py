"""Which decoder blocks recompute their activations in backward, chosen from measured memory.

Checkpointing every block costs a second forward of each (a quarter of the step's matmul work). A block
that does not recompute keeps its saved activations from its forward until its backward instead. So once
the first steps have shown the real peak, heavylift measures what one block keeps (the probe: one block
runs unchecked for a step, and the allocator's growth from its pre-hook to its post-hook is what it
saved) and stops checkpointing as many blocks as the memory left allows.

The switch is transformers' own per-layer ``gradient_checkpointing`` attribute, which its checkpoint
wrapper reads on every call (``model.gradient_checkpointing_enable`` sets it on every layer).
"""

from __future__ import annotations

import torch
from torch import nn


def checkpointed(block: nn.Module) -> bool:
    return bool(getattr(block, "gradient_checkpointing", False))


def set_checkpointed(block: nn.Module, on: bool) -> None:
    if not hasattr(block, "gradient_checkpointing"):
        raise TypeError(f"{type(block).__name__} has no gradient_checkpointing switch")
    block.gradient_checkpointing = on


def blocks_to_uncheck(spare_bytes: int, per_block_bytes: int, margin: float = 1.15) -> int:
    """How many more blocks may keep their activations: the spare memory over one block's (with margin)."""
    if per_block_bytes <= 0 or spare_bytes <= 0:
        return 0
    return int(spare_bytes // int(per_block_bytes * margin))


class ActivationProbe:
    """Measures, in the forward of one unchecked block, the bytes it leaves allocated.

    The pre-hook runs first of the block's pre-hooks (before FSDP2 gathers the weights) and the post-hook
    last (after FSDP2 frees them), so what remains is the activations saved for backward plus the block's
    output, which the next block's input would hold anyway.
    """

    def __init__(self, block: nn.Module, device: torch.device):
        self.block, self.device = block, device
        self.bytes = 0
        self._before = 0
        self._handles = [
            block.register_forward_pre_hook(self._pre, prepend=True),
            block.register_forward_hook(self._post),
        ]

    def _pre(self, _m, _a) -> None:
        if torch.is_grad_enabled():
            self._before = torch.cuda.memory_allocated(self.device)

    def _post(self, _m, _a, _o) -> None:
        if torch.is_grad_enabled():
            self.bytes = max(self.bytes, torch.cuda.memory_allocated(self.device) - self._before)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
