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


def tail_param_bytes(state_bytes: float, grad_bytes: int, host_accumulate: bool, accum: int) -> float:
    """GPU bytes a parameter costs when it moves to the tail: its state, and under ``offload.accumulate
    host`` with accumulation also its window's gradient sum, which its host bucket kept off the card
    (a tail bucket's sum stays in FSDP2's ``.grad``). The placement and the planner both use this."""
    return state_bytes + (grad_bytes if host_accumulate and accum > 1 else 0)


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


def tail_for_hiding(host_numels: list[int], needed_at: list[float], params_per_s: float) -> int:
    """How many host buckets (arrival order; moved last-arriving first) must join the GPU tail so that a
    clipped step hides: after backward the CPU re-steps the host buckets one by one in forward order, and
    each must be done before the next forward reaches it.

    ``needed_at[i]`` is when (seconds after the step) the forward needs bucket ``i``. Moving the buckets
    needed first (the last to arrive) both removes their CPU time and gives the rest more forward to hide
    behind, so the answer is the smallest suffix that makes every remaining deadline.
    """
    if params_per_s <= 0:
        return 0
    n = len(host_numels)
    for moved in range(n + 1):
        done, ok = 0.0, True
        for i in reversed(range(n - moved)):  # forward order: last-arriving first
            done += host_numels[i] / params_per_s
            if done > needed_at[i]:
                ok = False
                break
        if ok:
            return moved
    return n


def forward_deadlines(unit_of_bucket: list[int], unit_numels: dict[int, int], root_unit: int,
                      forward_s: float) -> list[float]:
    """When the next forward reaches each bucket's unit, if forward time goes with block size: the root
    unit (embeddings) at 0, block ``u`` after the blocks before it."""
    blocks = sorted(u for u in unit_numels if u != root_unit)
    total = sum(unit_numels[u] for u in blocks) or 1
    start, acc = {root_unit: 0.0}, 0
    for u in blocks:
        start[u] = forward_s * acc / total
        acc += unit_numels[u]
    return [start[u] for u in unit_of_bucket]
