"""How many buckets keep their optimizer on the GPU (the "tail"), from measured memory.

The buckets whose gradients arrive last have no backward left to hide a CPU step behind, and every
bucket moved to the GPU is CPU work and link traffic removed from the step; the GPU steps it at HBM
speed (28 B/param at ~3 TB/s: ~10 ms per billion parameters). The only price is GPU memory: 16 bytes
per parameter for fp32 state (master, two moments, gradient; the compact formats' tails take less,
optim/formats.py). So after the first step has shown the real peak
(weights, activations, logits, allocator slack), the tail grows into the memory left, keeping a margin.
"""

from __future__ import annotations

TAIL_BYTES_PER_PARAM = 16
MARGIN_FRACTION = 0.10  # of the card, for fragmentation and peaks the first step did not show
MARGIN_BYTES = 2 * 1024**3


def tail_budget_params(total_bytes: int, peak_bytes: int, bytes_per_param: float = TAIL_BYTES_PER_PARAM) -> int:
    """Parameters whose tail state fits beside the measured peak, keeping the margin."""
    spare = total_bytes * (1.0 - MARGIN_FRACTION) - MARGIN_BYTES - peak_bytes
    return max(int(spare // bytes_per_param), 0)


def buckets_to_move(host_numels: list[int], budget_params: int) -> int:
    """How many of the host buckets (given in arrival order) to move, taking the last-arriving first."""
    moved, used = 0, 0
    for n in reversed(host_numels):
        if used + n > budget_params:
            break
        used += n
        moved += 1
    return moved
