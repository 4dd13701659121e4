"""The tolerance every equivalence test uses, and why.

Same gradients and the same fused kernel give bitwise-equal AdamW results (asserted where it holds:
one rank, no clipping). Otherwise the gradients differ from the reference's by fp32 rounding only: the
clip coefficient comes from a differently ordered sum of squares, and with two ranks the reduce-scatter
sums the ranks' gradients in another order. AdamW's update is lr * m_hat / (sqrt(v_hat) + eps), whose
size is at most about lr per step whatever the gradient scale, and a relative gradient error of ~1e-7
moves it by far less than 1e-4 of that. So after N steps the weights may differ by at most
N * lr * 1e-4, and the moments by 1e-4 of their largest magnitude; a real bug (a missed step, a wrong
lr, a lost clip, an unrestored skip) shows up as an error of order lr or more per step, 10^4 times larger.
The bound assumes the trajectory does not amplify rounding; at a large lr a tiny model's can, and the
cases keep their lr where it does not (equivalence.py's clip_mixed says what was measured).
"""

from __future__ import annotations

REL = 1e-4


def check(result: dict, steps: int, lr: float) -> None:
    assert result["max_param_diff"] <= steps * lr * REL, result
    assert result["max_avg_sq_rel"] <= REL, result
    assert result["steps_equal"], result
    assert result["lr_equal"], result
    for mine, theirs in result["skipped"]:
        assert mine == theirs, result["skipped"]
    # the trajectories drift apart by rounding, so the norms do too (a missing all-reduce is 40% off)
    for mine, theirs in result["norms"]:
        if theirs == theirs and theirs != float("inf"):
            assert abs(mine - theirs) <= 1e-3 * max(theirs, 1e-12), result["norms"]
