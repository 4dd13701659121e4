"""Reassemble a full tensor from every rank's dim-0 shard (``shard.layout``'s row split)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from heavylift.dist.guard import guarded


def gather_full(local: torch.Tensor, full_shape: torch.Size, device: torch.device,
                phase: str = "full-tensor all-gather") -> torch.Tensor:
    """The whole tensor on the CPU, from this rank's shard ``local`` and the other ranks' (collective)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    local = local.detach()
    if world > 1:
        rows = full_shape[0] if len(full_shape) else 1
        chunk = -(-rows // world)  # the largest shard; shorter ones are padded to it
        pad = torch.zeros((chunk, *local.shape[1:]), dtype=local.dtype, device=device)
        pad[: local.shape[0]] = local.to(device)
        parts = [torch.empty_like(pad) for _ in range(world)]
        with guarded(phase, device=device):
            dist.all_gather(parts, pad)
        local = torch.cat([t.to("cpu") for t in parts])[:rows]
    return local.to("cpu").reshape(full_shape).clone()
