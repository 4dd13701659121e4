"""A causal-LM loss that never holds the fp32 logits of the whole batch.

The stock loss upcasts all logits to fp32 (tokens x vocab x 4 bytes: 10 GB for 16K tokens of a
152K vocabulary) and keeps that and its gradient alive through backward. This one splits the bf16 logits
into row chunks and computes each chunk's fp32 cross-entropy under activation checkpointing, so only one
chunk is ever upcast. Same per-token arithmetic; only the order of the final sum differs. It is installed
through the model's public ``loss_function`` setter (transformers), not by patching its code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_ce_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")


def chunked_causal_lm_loss(chunk_tokens: int):
    """A ``loss_function`` for ``*ForCausalLM`` models with the stock signature and semantics."""

    def loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
             shift_labels=None, **_kwargs):
        if shift_labels is None:
            labels = F.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        flat = logits.reshape(-1, vocab_size)
        targets = shift_labels.reshape(-1).to(flat.device)
        total = flat.new_zeros((), dtype=torch.float32)
        # split (not slicing): its backward concatenates the chunk gradients once
        for x, y in zip(flat.split(chunk_tokens), targets.split(chunk_tokens)):
            total = total + checkpoint(_chunk_ce_sum, x, y, ignore_index, use_reentrant=False)
        if num_items_in_batch is None:
            denom = (targets != ignore_index).sum()
        else:
            denom = num_items_in_batch
            if torch.is_tensor(denom):
                denom = denom.to(total.device)
        return total / denom

    return loss
