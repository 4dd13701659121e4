"""Compiled blocks, applied from outside the model: each decoder block's children (its norms, attention
and MLP) go through ``torch.compile``, so the elementwise work between the matmuls (RMSNorm in fp32,
rotary embedding, SiLU x up, the q/k norms) runs as a few fused kernels instead of dozens, in forward,
in the activation-checkpoint recompute and in backward.

The block itself stays eager: it carries FSDP2's unshard/reshard hooks, heavylift's per-unit wait for its
optimizer buckets, and transformers' checkpoint wrapper, none of which belong inside a graph. Children
of the same class share one compiled graph (parameters are graph inputs), so 36 blocks compile once.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(blocks: list[nn.Module]) -> int:
    """Compile every child of each block that holds parameters; returns how many were compiled."""
    n = 0
    for block in blocks:
        for child in block.children():
            if next(child.parameters(), None) is not None:
                child.compile(dynamic=False)
                n += 1
    return n


def wanted(setting: str, device: torch.device) -> bool:
    """``compile: auto`` compiles on CUDA only: on CPU, inductor's build time outweighs what it saves."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")
