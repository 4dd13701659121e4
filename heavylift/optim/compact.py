"""AdamW on compact state (``int8-moments``, ``bf16-master``, ``bf16-master-int8``) in plain torch ops, in any
float dtype.

The same math as the native CPU kernels (optim/csrc), written once: in float32 on the GPU it steps
the GPU-tail buckets of these formats (per-chunk temporaries, chunks of at most ``CHUNK`` elements);
in float64 on the CPU it is the tests' reference for the kernels (``bf16-master-int8`` has no GPU tail of
its own: its tail buckets are int8-moments', optim/formats.py).

``src`` and ``dst`` map a format's state kinds to tensors (``dst`` may be ``src``: in place); the
gradient is multiplied by ``grad_mul`` (unscale and clip) inside the step and is not modified.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from heavylift.optim.adamw import AdamWHyper
from heavylift.optim.quant import dequantize_m, dequantize_r, quantize_m, quantize_r
from heavylift.optim.stochastic import stochastic_bf16

CHUNK = 1 << 24  # elements per pass on the GPU tail: bounds the fp32 temporaries (~6 x 64 MiB)


def adamw_math(p: Tensor, m: Tensor, v: Tensor, g: Tensor, hp: AdamWHyper, step: int
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torch.optim.AdamW's update on dequantized values: (p, m, v, sqrt(v)) after the step."""
    m = m * hp.beta1 + g * (1 - hp.beta1)
    v = v * hp.beta2 + g * g * (1 - hp.beta2)
    r = v.sqrt()
    step_size = hp.lr / (1 - hp.beta1 ** step)
    denom = r / math.sqrt(1 - hp.beta2 ** step) + hp.eps
    if hp.weight_decay:
        p = p * (1 - hp.lr * hp.weight_decay)
    return p - step_size * m / denom, m, v, r


def int8_moments_step(src: dict[str, Tensor], dst: dict[str, Tensor], grad: Tensor, hp: AdamWHyper, step: int,
                      grad_mul: float, row_len: int, dtype: torch.dtype = torch.float32) -> None:
    """fp32 master; m and sqrt(v) block-quantized (optim/quant.py); rows processed in chunks."""
    _int8_moments(src, dst, grad, hp, step, grad_mul, row_len, dtype, lambda p, first: p)


def bf16_master_int8_step(src: dict[str, Tensor], dst: dict[str, Tensor], grad: Tensor, hp: AdamWHyper,
                          step: int, grad_mul: float, row_len: int, dtype: torch.dtype = torch.float32,
                          sr: tuple[int, int] = (0, 0)) -> None:
    """bf16 master, no compensation: the stepped master in fp32 is rounded stochastically to bf16
    (optim/stochastic.py; ``sr`` = (the parameter's stream key, global index of the shard's first
    element)); m and sqrt(v) as int8-moments keeps them."""
    key, offset = sr

    def store(p: Tensor, first: int) -> Tensor:
        return stochastic_bf16(p.to(torch.float32), key, step, offset + first)

    _int8_moments(src, dst, grad, hp, step, grad_mul, row_len, dtype, store)


def _int8_moments(src: dict[str, Tensor], dst: dict[str, Tensor], grad: Tensor, hp: AdamWHyper, step: int,
                  grad_mul: float, row_len: int, dtype: torch.dtype,
                  store_master: Callable[[Tensor, int], Tensor]) -> None:
    """AdamW with m and sqrt(v) block-quantized, in chunks of rows; ``store_master(p, first)`` turns the
    stepped master of elements ``first ..`` of the shard into what is stored."""
    rows = grad.numel() // row_len if row_len else 0
    per = max(CHUNK // max(row_len, 1), 1)
    flat = {k: t.reshape(rows, -1) for k, t in src.items()}
    out = {k: t.reshape(rows, -1) for k, t in dst.items()}
    g2 = grad.reshape(rows, -1)
    for r0 in range(0, rows, per):
        sl = slice(r0, min(r0 + per, rows))
        s = {k: t[sl] for k, t in flat.items()}
        g = g2[sl].to(dtype) * grad_mul
        m = dequantize_m(s["exp_avg"], s["exp_avg_scale"], row_len, dtype)
        r = dequantize_r(s["exp_avg_sq"], s["exp_avg_sq_scale"], row_len, dtype)
        p, m, _, r = adamw_math(s["master"].to(dtype), m, r * r, g, hp, step)
        m_codes, m_scale = quantize_m(m, row_len)
        r_codes, r_scale = quantize_r(r, row_len)
        o = {k: t[sl] for k, t in out.items()}
        o["master"].copy_(store_master(p, r0 * row_len))
        o["exp_avg"].copy_(m_codes)
        o["exp_avg_scale"].copy_(m_scale)
        o["exp_avg_sq"].copy_(r_codes)
        o["exp_avg_sq_scale"].copy_(r_scale)


def bf16_master_step(src: dict[str, Tensor], dst: dict[str, Tensor], grad: Tensor, hp: AdamWHyper, step: int,
                     grad_mul: float, row_len: int = 1, dtype: torch.dtype = torch.float32) -> None:
    """bf16 master with Kahan compensation: the master is the unevaluated sum ``master + master_comp``
    of two bf16 numbers (~16 significant bits); after the update ``master`` is the sum rounded to bf16
    and ``master_comp`` the rounding residual (exact in fp32), itself rounded to bf16. bf16 moments."""
    n = grad.numel()
    flat = {k: t.reshape(-1) for k, t in src.items()}
    out = {k: t.reshape(-1) for k, t in dst.items()}
    g_all = grad.reshape(-1)
    for i in range(0, n, CHUNK):
        sl = slice(i, min(i + CHUNK, n))
        s = {k: t[sl] for k, t in flat.items()}
        g = g_all[sl].to(dtype) * grad_mul
        e = s["master"].to(dtype) + s["master_comp"].to(dtype)
        e, m, v, _ = adamw_math(e, s["exp_avg"].to(dtype), s["exp_avg_sq"].to(dtype), g, hp, step)
        p = e.to(torch.bfloat16)
        o = {k: t[sl] for k, t in out.items()}
        o["master_comp"].copy_((e - p.to(dtype)).to(torch.bfloat16))
        o["master"].copy_(p)
        o["exp_avg"].copy_(m.to(torch.bfloat16))
        o["exp_avg_sq"].copy_(v.to(torch.bfloat16))


def split_bf16(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` as a bf16 pair (hi, lo): hi = x rounded to bf16, lo = the residual rounded to bf16."""
    hi = x.to(torch.bfloat16)
    return hi, (x.to(torch.float32) - hi.to(torch.float32)).to(torch.bfloat16)


STEPS = {"int8-moments": int8_moments_step, "bf16-master": bf16_master_step}
