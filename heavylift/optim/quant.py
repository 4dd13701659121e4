"""Block quantization of Adam moments (the ``int8-moments`` state format), as pure torch functions.

Blocks follow rows. A shard of a parameter is ``rows x row_len`` (dim 0 is the dimension FSDP2 shards;
``row_len`` is the product of the others, 1 for vectors); each row is cut into blocks of ``BLOCK``
elements, the last one ragged when ``row_len`` is not a multiple of ``BLOCK``. So the scales of a shard
form a ``rows x ceil(row_len / BLOCK)`` tensor that shards along dim 0 exactly as the parameter does, and
a checkpoint reshards to another world size without requantizing (docs/state-formats.md).

Two codes, each with one fp32 scale per block (the block's absolute maximum):

- ``exp_avg`` (m): signed linear int8, ``m = code * absmax / 127``, code in [-127, 127], round to
  nearest even.
- ``exp_avg_sq`` (v): the square root ``r = sqrt(v)`` (what the update divides by), as an unsigned
  8-bit float relative to the block's max: 4 exponent bits, 4 mantissa bits. ``r / absmax`` in
  [2^-15, 1] keeps 1 + 4 significant bits (relative error <= 2^-5, uniform across 4.5 decades),
  mantissa rounded to nearest even; code 0 is exactly 0; a non-zero value below 2^-15 of the block's
  max is stored as 2^-15 (its update is under-, never over-estimated). Codes 1..241 are used.

Every function works on any float dtype and device: the CPU kernel's float64 reference in the tests
and the GPU-tail step (fp32) both call them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BLOCK = 256
M_LEVELS = 127.0
E4M4_MIN_EXP = -15  # r / absmax below 2^-15 is stored as 2^-15
E4M4_MAX_CODE = 1 + 16 * (-E4M4_MIN_EXP)  # 241: r == absmax


def blocks_per_row(row_len: int) -> int:
    return math.ceil(row_len / BLOCK) if row_len > 0 else 0


def scale_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """Shape of the per-block scales of a tensor of ``shape`` (dim 0 = rows; 0-d is one row of one)."""
    rows, row_len = rows_and_len(shape)
    return rows, blocks_per_row(row_len)


def rows_and_len(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def _blocked(x: Tensor, row_len: int) -> Tensor:
    """``x`` (any shape, ``rows * row_len`` elements) as ``rows x blocks x BLOCK``, zero-padded."""
    x2 = x.reshape(-1, row_len)
    pad = blocks_per_row(row_len) * BLOCK - row_len
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, pad))
    return x2.reshape(x2.shape[0], -1, BLOCK)


def _unblocked(x3: Tensor, row_len: int, like: Tensor) -> Tensor:
    return x3.reshape(x3.shape[0], -1)[:, :row_len].reshape(like.shape)


def block_absmax(x: Tensor, row_len: int) -> Tensor:
    """``rows x blocks`` absolute maxima (0 for an all-zero block)."""
    return _blocked(x, row_len).abs().amax(dim=-1)


def quantize_m(m: Tensor, row_len: int) -> tuple[Tensor, Tensor]:
    """(int8 codes shaped like ``m``, absmax per block in ``m``'s dtype)."""
    absmax = block_absmax(m, row_len)
    inv = torch.where(absmax > 0, M_LEVELS / absmax, torch.zeros_like(absmax))
    q = torch.round(_blocked(m, row_len) * inv.unsqueeze(-1)).clamp_(-M_LEVELS, M_LEVELS)
    return _unblocked(q, row_len, m).to(torch.int8), absmax


def dequantize_m(codes: Tensor, absmax: Tensor, row_len: int, dtype: torch.dtype) -> Tensor:
    step = (absmax.to(dtype) / M_LEVELS).reshape(-1, blocks_per_row(row_len), 1)
    return _unblocked(_blocked(codes.to(dtype), row_len) * step, row_len, codes)


def encode_e4m4(y: Tensor) -> Tensor:
    """uint8 codes of ``y`` in [0, 1] (see the module docstring)."""
    mant, exp = torch.frexp(y)  # y = mant * 2^exp, mant in [0.5, 1)
    e = exp.to(torch.int32) - 1
    q = torch.round((mant * 2 - 1) * 16).to(torch.int32)  # 4 mantissa bits, round to nearest even
    e = e + (q == 16).to(torch.int32)
    q = torch.where(q == 16, 0, q)
    code = (e - E4M4_MIN_EXP) * 16 + q + 1
    code = torch.where(e < E4M4_MIN_EXP, 1, code)
    return torch.where(y > 0, code, 0).to(torch.uint8)


def decode_e4m4(codes: Tensor, dtype: torch.dtype) -> Tensor:
    k = codes.to(torch.int32) - 1
    mant = 1 + (k % 16).to(dtype) / 16
    y = torch.ldexp(mant, (k // 16 + E4M4_MIN_EXP).to(dtype))
    return torch.where(codes > 0, y, torch.zeros((), dtype=dtype, device=codes.device))


def quantize_r(r: Tensor, row_len: int) -> tuple[Tensor, Tensor]:
    """(uint8 codes shaped like ``r``, absmax per block) for ``r = sqrt(v) >= 0``."""
    absmax = block_absmax(r, row_len)
    inv = torch.where(absmax > 0, 1 / absmax, torch.zeros_like(absmax))
    y = _blocked(r, row_len) * inv.unsqueeze(-1)
    return encode_e4m4(_unblocked(y, row_len, r)), absmax


def dequantize_r(codes: Tensor, absmax: Tensor, row_len: int, dtype: torch.dtype) -> Tensor:
    y = _blocked(decode_e4m4(codes, dtype), row_len)
    return _unblocked(y * absmax.to(dtype).reshape(-1, blocks_per_row(row_len), 1), row_len, codes)
