"""Optimizer state formats (``offload.state_format``): which buffers hold a parameter's state, their
dtypes and bytes, and which kernel steps them. docs/state-formats.md has the measured error of each.

A format is a list of state buffers (the gradient slot, pinned, comes on top of every one: fp32 or bf16
on the host, optim/grad_slot.py; fp32 on the GPU tail).
Per-element buffers are shaped like the parameter's shard; per-block ones (quantization scales) are
``rows x ceil(row_len / BLOCK)`` (optim/quant.py). The order of ``buffers`` is the order of the native
kernel's arguments. Host buckets use the format; GPU-tail buckets use its ``tail`` format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from heavylift.optim.adamw import AdamWHyper
from heavylift.optim.quant import BLOCK, dequantize_m, dequantize_r

GRAD_BYTES = 4  # the fp32 gradient slot (the GPU tail's always; the host's unless offload.grad_slot is bf16)


@dataclass(frozen=True)
class Buffer:
    kind: str
    dtype: torch.dtype
    per_block: bool = False  # one value per quantization block (else one per element)
    link: bool = False  # crosses the link (the master: uploaded to the GPU after each step); pinned


@dataclass(frozen=True)
class StateFormat:
    name: str
    buffers: tuple[Buffer, ...]
    tail: str  # format of the GPU-tail buckets
    kernel: str  # the native module's function
    exact: bool  # exact AdamW (to fp32 rounding)
    stochastic: bool = False  # the master is stochastically rounded (the kernel takes a stream key and offset)

    @property
    def blocked(self) -> bool:
        """Some buffers are per quantization block (the kernel takes the row length and block size)."""
        return any(b.per_block for b in self.buffers)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(b.kind for b in self.buffers)

    @property
    def master_dtype(self) -> torch.dtype:
        return self.buffers[0].dtype

    def _bytes(self, link: bool | None = None) -> float:
        return sum(b.dtype.itemsize / (BLOCK if b.per_block else 1) for b in self.buffers
                   if link is None or b.link == link)

    @property
    def state_bytes(self) -> float:
        """Bytes/param with an fp32 gradient slot (a GPU tail's): the buffers plus the slot (full rows of
        BLOCK; ragged rows add 8 bytes per extra block)."""
        return self._bytes() + GRAD_BYTES

    def host_bytes(self, grad_bytes: float) -> float:
        """Host bytes/param: the buffers plus a gradient slot of ``grad_bytes`` (offload.grad_slot)."""
        return self._bytes() + grad_bytes

    def host_pinned_bytes(self, grad_bytes: float) -> float:
        """Pinned bytes/param of one host buffer set: the master and a ``grad_bytes`` gradient slot."""
        return self._bytes(link=True) + grad_bytes

    @property
    def back_bytes(self) -> float:
        """Bytes/param of the second buffer set that speculation writes (all buffers, no gradient)."""
        return self._bytes()

    @property
    def pinned_bytes(self) -> float:
        """Pinned bytes/param of one buffer set: the master and the gradient slot."""
        return self._bytes(link=True) + GRAD_BYTES

    @property
    def upload_bytes(self) -> float:
        """Bytes/param sent up to the GPU after a step (the master as stored; cast there if needed)."""
        return self._bytes(link=True)


_FP32_MOMENTS = (Buffer("exp_avg", torch.float32), Buffer("exp_avg_sq", torch.float32))
_BF16_MOMENTS = (Buffer("exp_avg", torch.bfloat16), Buffer("exp_avg_sq", torch.bfloat16))
_INT8_MOMENTS = (Buffer("exp_avg", torch.int8), Buffer("exp_avg_scale", torch.float32, per_block=True),
                 Buffer("exp_avg_sq", torch.uint8), Buffer("exp_avg_sq_scale", torch.float32, per_block=True))

FORMATS: dict[str, StateFormat] = {f.name: f for f in (
    StateFormat("fp32", (Buffer("master", torch.float32, link=True), *_FP32_MOMENTS), tail="fp32",
                kernel="adamw_step", exact=True),
    StateFormat("bf16-moments", (Buffer("master", torch.float32, link=True), *_BF16_MOMENTS), tail="fp32",
                kernel="adamw_step_bf16_moments", exact=False),
    StateFormat("int8-moments", (Buffer("master", torch.float32, link=True), *_INT8_MOMENTS),
                tail="int8-moments", kernel="adamw_step_int8_moments", exact=False),
    StateFormat("bf16-master", (Buffer("master", torch.bfloat16, link=True), Buffer("master_comp", torch.bfloat16),
                                *_BF16_MOMENTS),
                tail="bf16-master", kernel="adamw_step_bf16_master", exact=False),
    # Its GPU tail is int8-moments': the cheapest tail there is (10.03 B/param with the tail's fp32 slot, vs
    # 12 for bf16-master's), with the same moment codes and scales, so moving a bucket there copies its
    # state exactly (the bf16 master widens), and an fp32 master needs no random bits on the GPU.
    StateFormat("bf16-master-int8", (Buffer("master", torch.bfloat16, link=True), *_INT8_MOMENTS),
                tail="int8-moments", kernel="adamw_step_bf16_master_int8", exact=False, stochastic=True),
)}


# Formats whose GPU tail is the format itself: the GPU can step their host state as it is stored
# (offload.gpu_assist); the others' tail is another format.
SELF_TAILED = tuple(name for name, f in FORMATS.items() if f.tail == name)


def native_step(module, fmt: StateFormat, src: dict[str, Tensor], dst: dict[str, Tensor], grad: Tensor,
                hp: AdamWHyper, step: int, grad_mul: float, row_len: int, sr: tuple[int, int] = (0, 0)) -> None:
    """One step of heavylift's CPU kernel for ``fmt``: reads ``src``, writes ``dst`` (may be ``src``).
    ``sr``: a stochastically rounded master's (stream key, global index of the shard's first element)."""
    extra = ((row_len, BLOCK) if fmt.blocked else ()) + (tuple(sr) if fmt.stochastic else ())
    getattr(module, fmt.kernel)(*(src[k] for k in fmt.kinds), grad, *(dst[k] for k in fmt.kinds), *extra,
                                hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, step, grad_mul)


def master_fp32(state: dict[str, Tensor]) -> Tensor:
    """The master weight in fp32 (with a bf16 master: master + compensation)."""
    master = state["master"].to(torch.float32)
    return master + state["master_comp"].to(torch.float32) if "master_comp" in state else master


def moments_fp32(state: dict[str, Tensor], row_len: int) -> tuple[Tensor, Tensor]:
    """(exp_avg, exp_avg_sq) in fp32, dequantized where they are stored as codes."""
    if "exp_avg_scale" in state:
        r = dequantize_r(state["exp_avg_sq"], state["exp_avg_sq_scale"], row_len, torch.float32)
        return dequantize_m(state["exp_avg"], state["exp_avg_scale"], row_len, torch.float32), r * r
    return state["exp_avg"].to(torch.float32), state["exp_avg_sq"].to(torch.float32)


def names() -> str:
    return ", ".join(FORMATS)
