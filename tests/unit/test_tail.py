"""GPU-tail sizing from measured memory (pure arithmetic)."""

from heavylift.offload.tail import (MARGIN_BYTES, buckets_to_move, forward_deadlines, tail_budget_params,
                                    tail_for_hiding)

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


def test_hiding_needs_no_tail_when_the_cpu_keeps_up():
    # 4 equal host buckets, forward needs them at 0.1 s intervals starting 0.1 s after the step;
    # the CPU re-steps one in 0.05 s: every deadline holds
    numels = [100] * 4
    deadlines = [0.4, 0.3, 0.2, 0.1]  # arrival order: the last to arrive is needed first
    assert tail_for_hiding(numels, deadlines, params_per_s=2000) == 0


def test_hiding_moves_the_buckets_needed_first():
    numels = [100] * 4
    deadlines = [0.4, 0.3, 0.2, 0.1]
    # 0.08 s per bucket: done at 0.08, 0.16, 0.24, 0.32 against 0.1, 0.2, 0.3, 0.4
    assert tail_for_hiding(numels, deadlines, params_per_s=1250) == 0
    # 0.15 s per bucket: moving 1 leaves done times 0.15, 0.30, 0.45 against 0.2, 0.3, 0.4 -> fail; 2 -> 0.15, 0.3
    assert tail_for_hiding(numels, deadlines, params_per_s=100 / 0.15) == 2
    # a CPU far too slow: everything must move
    assert tail_for_hiding(numels, deadlines, params_per_s=1.0) == 4
    assert tail_for_hiding(numels, deadlines, params_per_s=0.0) == 0  # no measurement: no opinion


def test_forward_deadlines_follow_block_sizes_and_put_the_root_first():
    unit_numels = {0: 100, 1: 100, 2: 200, 3: 50}  # unit 3 is the root (embeddings)
    # buckets in arrival order: block 2 (two buckets), block 1, block 0, root
    d = forward_deadlines([2, 2, 1, 0, 3], unit_numels, root_unit=3, forward_s=1.0)
    assert d == [0.5, 0.5, 0.25, 0.0, 0.0]


def _stand_in(monkeypatch, auto: bool, share: float, redo_assisted: bool, first_ram: int = 0):
    """The measured placement on a stand-in engine (one rank): 8 host buckets of 1 M params, CPU 1e7
    params/s, forward 0.2 s, memory for all of them; gpu_assist auto (the link timed at 1.8e8 B/s, which
    balances fp32 at 0.5) or a hand-set ``share``. The placement and the engine."""
    import types

    import heavylift.offload.placement as placement
    from heavylift.engine_placement import InitPlacement
    from heavylift.offload.placement import AutoPlacement
    from heavylift.optim.formats import FORMATS

    monkeypatch.setattr(placement, "link_bytes_per_s", lambda device, pinned: 1.8e8)
    numels, units = [2**20] * 8, [6, 5, 4, 3, 2, 1, 0, 7]
    e = types.SimpleNamespace(env=types.SimpleNamespace(world_size=1, is_main=False), device=None,
                              first_ram=first_ram, first_tail=8, grown=[], state_format=FORMATS["fp32"],
                              grad_slot="bf16", config=types.SimpleNamespace(offload=types.SimpleNamespace(pin_memory=True)),
                              buckets=[types.SimpleNamespace(spec=types.SimpleNamespace(numel=n, unit=u))
                                       for n, u in zip(numels, units)])
    e._min_over_ranks = types.MethodType(InitPlacement._min_over_ranks, e)
    e.grow_tail = e.grown.append
    e.pipeline = types.SimpleNamespace(cpu_params=1e7, cpu_seconds=1.0, assisting=True, gpu_assist=share,
                                       redo_assisted=redo_assisted, wait_all=lambda: None)
    p = object.__new__(AutoPlacement)  # its __init__ reads the card; stage 2 needs only these
    p.engine, p.blocks, p.tail, p.recompute, p.tail_bytes, p.log, p.probe = e, [], True, False, 16, [], None
    p.assist, p.device, p._spare, p._forward_s = auto, None, lambda: 8 * 2**20 * 16, lambda: 0.2
    p.tracking, p._link, p._mark, p._since = False, 0.0, (0, 0.0), 0
    return p, e


def _stage2_tail(monkeypatch, auto: bool, share: float, redo_assisted: bool, first_ram: int = 0):
    """Stage 2 on the stand-in: what it grows and what it notes."""
    p, e = _stand_in(monkeypatch, auto, share, redo_assisted, first_ram)
    p._stage2()
    return e.grown, [m for m in p.log if "hide" in m][0]


def test_hiding_plans_with_the_pass_the_assist_shares(monkeypatch):
    deadlines = forward_deadlines([6, 5, 4, 3, 2, 1, 0, 7], {u: 2**20 for u in range(8)}, 7, 0.2)
    alone, shared = (tail_for_hiding([2**20] * 8, deadlines, r) for r in (1e7, 2e7))
    assert alone > shared  # the case separates the two rates
    grown, note = _stage2_tail(monkeypatch, auto=True, share=0.0, redo_assisted=True)
    assert grown == [shared] and "(0.02 with the assist)" in note
    # the CPU's rate where the redo of a speculated step is the CPU's alone, NVMe buckets are in the pass, or
    # the share was set by hand (above the balance, 1/(1-f) would overstate the pass)
    for kw in ({"auto": True, "redo_assisted": False}, {"auto": True, "first_ram": 1},
               {"auto": False, "share": 0.5}):
        args = {"share": 0.0, "redo_assisted": True, **kw}
        grown, note = _stage2_tail(monkeypatch, **args)
        assert grown == [alone] and "with the assist" not in note, kw


def test_an_auto_share_follows_the_cpu_measured_in_the_steps(monkeypatch):
    """After the placement, every TRACK_EVERY steps the share is balanced again against the CPU's rate over
    those steps: a CPU at a quarter of its first rate moves it from 0.5 up; noise within TRACK_STEP moves
    nothing; a checkpoint's settle() ends it; a hand-set share is never moved."""
    from heavylift.offload.assist_share import balanced_share
    from heavylift.offload.placement import TRACK_EVERY, TRACK_STEP

    p, e = _stand_in(monkeypatch, auto=True, share=0.0, redo_assisted=True)
    p._stage2()
    pipe = e.pipeline
    assert p.tracking and pipe.gpu_assist == 0.5
    p.stage = 5  # the placement is done: after_step now only tracks

    def steps(n: int, rate: float) -> None:
        for _ in range(n):
            pipe.cpu_params += 1e6
            pipe.cpu_seconds += 1e6 / rate
            p.after_step(False)

    steps(TRACK_EVERY, 1e7 * 0.97)  # within the noise: stays
    assert pipe.gpu_assist == 0.5 and not any("->" in m for m in p.log)
    steps(TRACK_EVERY - 1, 2.5e6)
    assert pipe.gpu_assist == 0.5  # not yet a full window
    steps(1, 2.5e6)
    want = int(balanced_share(2.5e6, 1.8e8, 12, 2, 4) * 1e6) / 1e6
    assert pipe.gpu_assist == want > 0.5 + TRACK_STEP
    assert f"gpu_assist 0.50 -> {want:.2f}: the CPU stepped 0.00 G params/s over the last {TRACK_EVERY} steps" in p.log
    p.after_step(True)  # a skipped step counts for nothing
    p.settle()
    steps(4 * TRACK_EVERY, 1e7)
    assert pipe.gpu_assist == want and not p.tracking

    p, e = _stand_in(monkeypatch, auto=False, share=0.3, redo_assisted=True)
    p._stage2()
    p.stage = 5
    e.pipeline.cpu_params, e.pipeline.cpu_seconds = 2e7, 8.0
    for _ in range(4 * TRACK_EVERY):
        p.after_step(False)
    assert not p.tracking and e.pipeline.gpu_assist == 0.3
