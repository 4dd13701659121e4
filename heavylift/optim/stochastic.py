"""Stochastic rounding of fp32 to bfloat16 with counter-based random bits (the ``bf16-master-int8`` master).

The random bits of an element are a hash of (its global index in the parameter, the step, the parameter's
stream key), and the key is a hash of (``seed``, the parameter's name): no generator state, so a step's
result is the same whatever the thread count, chunking or buffer set, a clip redo of a step draws what the
speculative step drew, and a resumed run continues with the bits of the uninterrupted one. The global index
(the shard's first row times the row length, plus the element's place in the shard) keeps a parameter's
bits the same for any rank count. ``csrc/stochastic_round.h`` is the same arithmetic in C++; here it is
in int64 torch ops (any device), the tests' reference.

The rounding: add 16 uniform random bits below bf16's 16 kept bits of the fp32 value and truncate, so the
value rounds up (in magnitude) with probability equal to the fraction of a bf16 ulp that is dropped and
its expectation is the fp32 value: an update far below half an ulp moves the weight in expectation
instead of being lost, at the price of noise of up to one ulp per step.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x, c: int):
    """(x * c) mod 2^32 for 0 <= x < 2^32, in int64 without overflow: c split into 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def fmix32(x):
    """MurmurHash3's 32-bit finalizer on a Python int or an int64 tensor of values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def stream_key(seed: int, name: str) -> int:
    """A parameter's 32-bit stream key (``engine.seed`` and the parameter's name)."""
    return fmix32(zlib.crc32(name.encode()) ^ fmix32(seed & MASK32) ^ ((seed >> 32) & MASK32))


def sr_stream(key: int, step: int) -> int:
    return fmix32(key ^ fmix32(_mul32(step & MASK32, _GOLDEN)))


def sr_bits(index: Tensor, stream: int) -> Tensor:
    """32 random bits (int64 in [0, 2^32)) for the elements at global ``index`` (int64) in ``stream``."""
    return fmix32(fmix32((index & MASK32) ^ stream) ^ (index >> 32))


def round_bf16_stochastic(x: Tensor, bits: Tensor) -> Tensor:
    """fp32 ``x`` stochastically rounded to bf16 with the random ``bits`` (same shape, int64 in [0, 2^32))."""
    u = x.to(torch.float32).view(torch.int32).to(torch.int64) & MASK32
    rounded = ((u + (bits >> 16)) >> 16) & 0xFFFF
    h = torch.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)
    return torch.where(h >= 0x8000, h - 0x10000, h).to(torch.int16).view(torch.bfloat16)


def stochastic_bf16(x: Tensor, key: int, step: int, first_index: int) -> Tensor:
    """``x`` (elements at global indices ``first_index ..`` in row-major order) rounded as the kernel rounds
    them at ``step``."""
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).reshape(x.shape) + first_index
    return round_bf16_stochastic(x, sr_bits(index, sr_stream(key, step)))
