"""GPU-tail sizing from measured memory (pure arithmetic)."""

from heavylift.offload.tail import MARGIN_BYTES, buckets_to_move, tail_budget_params

GiB = 1024**3


def test_budget_leaves_margin_and_peak():
    total, peak = 80 * GiB, 44 * GiB
    budget = tail_budget_params(total, peak)
    assert budget * 16 <= total * 0.9 - MARGIN_BYTES - peak
    assert budget * 16 > total * 0.9 - MARGIN_BYTES - peak - 16
    assert tail_budget_params(80 * GiB, 79 * GiB) == 0


def test_moves_last_arriving_buckets_first_and_stops_at_budget():
    numels = [100, 100, 50, 30]  # arrival order; the last ones arrive last
    assert buckets_to_move(numels, 0) == 0
    assert buckets_to_move(numels, 30) == 1
    assert buckets_to_move(numels, 79) == 1
    assert buckets_to_move(numels, 80) == 2
    assert buckets_to_move(numels, 10_000) == 4
