"""The host gradient slot's dtype (``offload.grad_slot``): where a bucket's reduced gradient waits, pinned,
until its step is validated. It is the largest per-parameter buffer that exists only for the pipeline
(4 of int8-moments' 10 bytes/param with fp32), so it decides what fits.

What the slot receives is FSDP2's sharded gradient: reduce-scattered in fp32 and then cast to the
parameter dtype on the GPU (shard/fsdp.py), accumulated across micro-batches in that dtype. With bf16
compute it is therefore a bf16 tensor already, for any rank count and accumulation: a bf16 slot holds it
exactly and the training is bitwise that of an fp32 slot. With fp32 compute (or fp16) the gradient has
more bits than bf16 keeps, and a bf16 slot rounds it (docs/state-formats.md); the compact formats are
not exact AdamW anyway, so they take the bf16 slot whatever the compute dtype.
"""

from __future__ import annotations

import torch

GRAD_SLOTS = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPACT_EXEMPT = ("fp32",)  # the exact format: "auto" keeps its slot lossless


def resolve(setting: str, state_format: str, compute_dtype: str) -> str:
    """"fp32" or "bf16": the slot ``setting`` ("auto", "fp32", "bf16") means for this run."""
    if setting != "auto":
        return setting
    if compute_dtype == "bf16" or state_format not in COMPACT_EXEMPT:
        return "bf16"
    return "fp32"


def why(setting: str, state_format: str, compute_dtype: str) -> str:
    """One line for the startup plan: the slot chosen and whether it rounds anything."""
    slot = resolve(setting, state_format, compute_dtype)
    if slot == "fp32":
        return "fp32 gradient slot (4 B/param): holds the gradient exactly"
    if compute_dtype == "bf16":
        return "bf16 gradient slot (2 B/param): FSDP2 hands over bf16 gradients, held exactly"
    return (f"bf16 gradient slot (2 B/param): rounds the {compute_dtype} gradient to bf16 "
            "(docs/state-formats.md)")


def slot_bytes(slot: str) -> int:
    return GRAD_SLOTS[slot].itemsize


def host_sums_refused(slot: str, compute_dtype: str) -> str | None:
    """Why offload.accumulate host cannot run with this slot, or None: the slot must hold the compute dtype
    for its sums to be FSDP2's (offload/accumulate.py)."""
    if slot == compute_dtype:
        return None
    fix = f"offload.grad_slot {compute_dtype} or " if compute_dtype in GRAD_SLOTS else ""
    return (f"offload.accumulate host sums gradients in the host slot, which must hold the compute dtype "
            f"({compute_dtype}) for the sums to be FSDP2's; this run's slot is {slot}: set {fix}offload.accumulate device")
