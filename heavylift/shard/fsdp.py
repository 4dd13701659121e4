"""Apply FSDP2 to a stock Hugging Face model from outside: one ``fully_shard`` per decoder block,
then one on the root (embeddings, final norm, head). The model's code is not touched."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks, in forward order.

    HF models name them in ``_no_split_modules``; otherwise the children of the longest ModuleList.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no decoder blocks found (no _no_split_modules, no ModuleList)")
    return list(max(lists, key=len))


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, reduce_dtype: torch.dtype) -> None:
    """Shard ``model`` in place. Parameters keep their dtype (the compute dtype); gradients are
    reduce-scattered in ``reduce_dtype`` and land in the parameter dtype."""
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce_dtype)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
