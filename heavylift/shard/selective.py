"""``engine.save_attention``: a recomputing block keeps its attention kernel's outputs and reruns the rest.

A checkpointed block normally keeps only its input and runs its whole forward again in backward. Of that
rerun, the attention kernel costs the most time for the least memory kept. For qwen3-4b at seq 4096 it is
14% of a block's forward FLOPs, run at a lower rate than the matmuls. Its output is only the size of one q
projection (2 B x heads x head_dim per token), plus an fp32 log-sum-exp per head. The matmuls, norms and RoPE that feed
it are recomputed as before, and the kernel's backward gets its saved output::

    forward      norm -> q,k,v -> RoPE -> [attention] -> o_proj -> norm -> MLP     keeps: input, [out, lse]
    backward     norm -> q,k,v -> RoPE ->  (cached)   -> o_proj -> norm -> MLP     then the block's backward

This uses torch's selective activation checkpointing (``create_selective_checkpoint_contexts``), passed as
the ``context_fn`` of the non-reentrant checkpoint that transformers' per-layer wrapper calls. The policy
sees the ops as they dispatch, and compiled children included: inductor calls the attention kernel as an
ATen op. A block that the placement lets keep all its activations does not checkpoint, so this does not
apply to it. The saved values are the ones the rerun would compute, so the gradients are the same bits.

Not with dropout: the rerun replays the forward's random numbers from a saved RNG state, and an attention
kernel served from the cache draws none, so every random op after it in the block would draw other numbers
than its forward did. ``dropout_in`` finds what would make that so, and the engine refuses the setting.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def _attention_ops() -> frozenset:
    """The scaled-dot-product attention kernels this torch build has (CUDA flash, memory-efficient, cuDNN;
    the CPU flash kernel)."""
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    return frozenset(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


ATTENTION_OPS = _attention_ops()


def policy(_ctx, op, *_args, **_kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def attention_saving_context():
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``."""
    return create_selective_checkpoint_contexts(policy)


def checkpoint_kwargs(save_attention: bool) -> dict:
    """The checkpoint arguments heavylift gives transformers' gradient checkpointing."""
    kwargs = {"use_reentrant": False}
    if save_attention:
        kwargs["context_fn"] = attention_saving_context
    return kwargs


def dropout_in(model: torch.nn.Module) -> str | None:
    """What in ``model`` draws random numbers in training (a dropout layer or an attention dropout above 0),
    or None."""
    p = float(getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0)
    if p > 0:
        return f"config.attention_dropout = {p:g}"
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{name} ({type(m).__name__}, p = {m.p:g})"
    return None


def saved_bytes_per_token(q_dim: int, heads: int = 0, dtype_bytes: int = 2) -> int:
    """What a checkpointed block keeps beyond its input, per token: the attention output (heads x head_dim
    in the compute dtype) and an fp32 log-sum-exp per head. ``heads`` 0 (not known) counts 64-wide heads,
    an upper bound for the usual 64 and 128."""
    return dtype_bytes * q_dim + 4 * (heads or q_dim // 64)
