"""AdamW arithmetic, kept apart from every stream, hook and thread.

The kernel is the one ``torch.optim.AdamW(fused=True)`` runs (``torch._fused_adamw_``): on the same
gradients it gives bitwise the same parameters and moments. It runs on CPU tensors (vectorized,
multi-threaded ATen kernel) and on CUDA tensors (the GPU tail) alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AdamWHyper:
    """One parameter group's hyper-parameters for one step."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


def adamw_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    hp: AdamWHyper,
) -> None:
    """One in-place AdamW step over same-device, same-dtype lists (steps: float32 scalar tensors)."""
    if not params:
        return
    torch._foreach_add_(steps, 1)
    torch._fused_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, [], steps,
        amsgrad=False, lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2,
        weight_decay=hp.weight_decay, eps=hp.eps, maximize=False,
        grad_scale=None, found_inf=None,
    )


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies every gradient by (1.0: no clipping)."""
    if max_norm <= 0 or not math.isfinite(total_norm):
        return 1.0
    return min(max_norm / (total_norm + 1e-6), 1.0)


def sum_of_squares(grads: list[Tensor]) -> Tensor:
    """Sum of squared entries over a list of tensors, accumulated in float32, as a 0-d tensor."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    return torch.stack(norms).square().sum()
