"""offload.gpu_assist on CPU: the buckets it takes, and that a step routed through it gives the bits the CPU
road gives (fp32: torch's fused kernel on both roads) or stays within the format's bound (compact formats
step in the GPU tail's torch ops), on 1 rank; clip, accumulation, skips and resume included. A clipped step
that speculated is shared too (double buffers): there the CPU road redoes natively, so only the reference
bounds it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from heavylift.config import EngineConfig
from heavylift.config.errors import ConfigError
from heavylift.config.schema import validate
from heavylift.offload.assist import assisted
from support.equivalence import Case, run_case
from support.tolerance import check


def test_assisted_interleaves_by_parameters():
    sizes = {b: 10 for b in range(8)}
    assert assisted(list(range(8)), sizes, 0.0) == set()
    assert assisted(list(range(8)), sizes, 1.0) == set(range(8))
    # forward order is descending index: the first bucket stepped (7) stays on the CPU, then every second
    assert assisted(list(range(8)), sizes, 0.5) == {6, 4, 2, 0}
    uneven = {0: 5, 1: 40, 2: 10, 3: 30, 4: 15}
    for f in (0.2, 0.4, 0.6, 0.8):
        taken = sum(uneven[b] for b in assisted(list(uneven), uneven, f))
        assert abs(taken - f * 100) <= max(uneven.values()) / 2, (f, taken)
    assert assisted([3, 1], sizes, 0.5) == {1}  # only the buckets given (the host ones)


CASES = [
    Case("clip_always_no_speculation", max_norm=0.05, speculate=False, steps=6, bucket_params=3000),
    Case("accum2_decay_bf16_slot", max_norm=0.05, speculate=False, grad_accum=2, weight_decay=0.1,
         dtype="bf16", steps=5, bucket_params=3000),
    Case("nan_skip", max_norm=1.0, speculate=False, nan_step=2, steps=5, bucket_params=3000),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fp32_assist_is_bitwise_the_cpu_road(case):
    on = run_case(dataclasses.replace(case, gpu_assist=0.5), keep_state=True)
    off = run_case(case, keep_state=True)
    assert on["stats"]["assisted"] > 0, on["stats"]
    assert off["stats"]["assisted"] == 0
    assert all(torch.equal(a, b) for a, b in zip(on["final_state"], off["final_state"], strict=True))
    assert repr(on["norms"]) == repr(off["norms"]) and on["skipped"] == off["skipped"]  # repr: NaN == NaN
    if case.dtype == "fp32":
        check(on, case.steps, case.lr)
    if case.nan_step >= 0:
        assert on["skipped"][case.nan_step] == (True, True) and on["skip_bit_identical"]


def test_a_clipped_step_that_speculated_shares_its_redo():
    """With double buffers (the native kernel) a speculated step leaves each bucket's state untouched, so when
    it clips the assist takes its share of the redo as it takes a share of a step that did not speculate.
    Those buckets then step with the road that did not speculate (torch's AdamW), the rest redo with the
    native kernel, so the run is not the bits of the assist-off run: both stay on the AdamW reference."""
    case = Case("clip_once_speculation_then_off", max_norm=0.5, steps=6, bucket_params=3000)
    on = run_case(dataclasses.replace(case, gpu_assist=0.5))
    off = run_case(case)
    assert off["stats"]["assisted"] == 0 and off["stats"]["redone"] > 0 and off["stats"]["redo_assisted"] == 0
    for k in ("speculated", "redone"):  # the same steps speculated, then clipped
        assert on["stats"][k] == off["stats"][k], (on["stats"], off["stats"])
    assert 0 < on["stats"]["redo_assisted"] < on["stats"]["redone"], on["stats"]  # a share of the redo
    check(on, case.steps, case.lr)
    check(off, case.steps, case.lr)


@pytest.mark.parametrize("fmt", ["int8-moments", "bf16-master"])
def test_compact_assist_stays_near_the_cpu_road(fmt):
    case = Case("compact", max_norm=0.05, speculate=False, steps=6, bucket_params=3000, state_format=fmt)
    on = run_case(dataclasses.replace(case, gpu_assist=1.0))
    off = run_case(case)
    assert on["stats"]["assisted"] > 0
    # the GPU tail's torch ops against the native kernel: both within the format's error of exact AdamW
    assert abs(on["rel_update_error"] - off["rel_update_error"]) < 0.05, (on["rel_update_error"], off["rel_update_error"])
    assert on["rel_update_error"] < 0.1


def test_gpu_assist_is_validated():
    ec = EngineConfig()
    ec.offload.gpu_assist = 1.5
    with pytest.raises(ConfigError, match="offload.gpu_assist"):
        validate(ec)
    ec.offload.gpu_assist, ec.offload.state_format = 0.5, "bf16-master-int8"
    with pytest.raises(ConfigError, match="bf16-master-int8"):
        validate(ec)


def test_balanced_share_ends_the_cpu_and_link_parts_together():
    from heavylift.offload.assist_share import MAX_SHARE, balanced_share, pass_speedup
    from heavylift.optim.formats import FORMATS

    fp32, int8 = FORMATS["fp32"], FORMATS["int8-moments"]
    assert (fp32.back_bytes, fp32.upload_bytes) == (12, 4)
    # the docstring's figures: 50 GB/s, 3.5 G params/s, a bf16 gradient slot
    f = balanced_share(3.5e9, 50e9, fp32.back_bytes, 2, fp32.upload_bytes)
    assert f == pytest.approx(0.4235, abs=1e-3)
    assert balanced_share(3.5e9, 50e9, int8.back_bytes, 2, int8.upload_bytes) == pytest.approx(0.56, abs=0.01)
    # at that share the CPU's (1 - f) N / R and the link's (f (S + g) + (1 - f) u) N / B are equal
    n, r, b = 1e9, 3.5e9, 50e9
    assert (1 - f) * n / r == pytest.approx((f * 14 + (1 - f) * 4) * n / b, rel=1e-9)
    assert pass_speedup(f) == pytest.approx(1.735, abs=1e-3)
    # session 6's H200 box (55.4 GB/s up, 4.14 G params/s mid-backward): 0.40, the measured best of 0/0.4/0.7
    assert balanced_share(4.14e9, 55.37e9, 12, 2, 4) == pytest.approx(0.40, abs=0.005)
    assert balanced_share(3.5e9, 10e9, 12, 2, 4) == 0.0  # a link slower than the CPU's own uploads: no gain
    assert balanced_share(0.0, 50e9, 12, 2, 4) == 0.0  # no CPU rate measured
    assert balanced_share(1e6, 50e9, 12, 2, 4) == MAX_SHARE  # a crawling CPU still keeps its share


def test_gpu_assist_auto_is_accepted_and_wanted_only_on_a_gpu_with_a_self_tailed_format():
    from heavylift.config.load import apply_overrides, build
    from heavylift.config.schema import assist_wanted

    ec = build(EngineConfig, apply_overrides({}, ["--offload.gpu_assist=auto"]))
    assert ec.offload.gpu_assist == "auto"
    validate(ec)
    assert assist_wanted(ec.offload, cuda=True) and not assist_wanted(ec.offload, cuda=False)
    ec.offload.state_format = "bf16-master-int8"  # the GPU does not step it: auto is off, not an error
    validate(ec)
    assert not assist_wanted(ec.offload, cuda=True)
    ec.offload.gpu_assist = 0.5
    with pytest.raises(ConfigError, match="0 or auto with state_format 'bf16-master-int8'"):
        validate(ec)
    with pytest.raises(ConfigError, match="offload.gpu_assist.*auto"):
        build(EngineConfig, apply_overrides({}, ["--offload.gpu_assist=sometimes"]))


def test_gpu_assist_auto_on_cpu_trains_as_off():
    """On a CPU device auto has nothing to balance against: no assist thread, no extra pinning, the same bits."""
    case = Case("auto", max_norm=0.05, speculate=False, steps=3, bucket_params=3000)
    off = run_case(case, keep_state=True)
    auto = run_case(dataclasses.replace(case, gpu_assist="auto"), keep_state=True)
    assert auto["stats"]["assisted"] == 0
    assert len(off["final_state"]) == len(auto["final_state"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(off["final_state"], auto["final_state"]))
    assert run_case(dataclasses.replace(case, gpu_assist=0.5))["stats"]["assisted"] > 0  # where a share would


@pytest.mark.parametrize("speculate", [False, True])
def test_resume_with_assist_is_bit_identical(tmp_path, speculate):
    """A checkpoint taken mid-run with assisted steps resumes into the same bits as the straight run (with
    speculation: a clipped speculated step's redo shared with the assist, and the steps after it not
    speculating)."""
    from heavylift.checkpoint import load, save
    from support.checkpointing import CASE, local_state, new_engine, train

    case = dataclasses.replace(CASE, gpu_assist=0.5, speculate=speculate, max_norm=0.05, bucket_params=3000)
    straight = new_engine(case=case)
    train(straight, range(4), case)
    ref, stats = local_state(straight), dict(straight.pipeline.stats)
    straight.close()
    assert stats["assisted"] > 0 and (stats["speculated"] > 0) == speculate, stats
    first = new_engine(case=case)
    train(first, range(2), case)
    save(first, tmp_path / "ckpt", "step-2")
    first.close()
    resumed = new_engine(seed=5, case=case)
    load(resumed, tmp_path / "ckpt", "latest")
    train(resumed, range(2, 4), case)
    assert all(torch.equal(a, b) for a, b in zip(local_state(resumed), ref, strict=True))
    resumed.close()


def test_buckets_with_a_slot_over_the_cap_stay_on_the_cpu(monkeypatch):
    import heavylift.offload.pipeline as pipeline

    monkeypatch.setattr(pipeline, "MAX_SLOT_PARAMS", 1)  # every slot is over it
    case = Case("capped", max_norm=0.05, speculate=False, steps=3, bucket_params=3000, gpu_assist=1.0)
    assert run_case(case)["stats"]["assisted"] == 0


def test_assist_traffic_is_counted_on_the_link():
    """The logged link GB/s includes the assist's copies: each assisted slot's state both ways + its gradient."""
    import heavylift
    from support.equivalence import batches, engine_config, tiny_model

    case = Case("link", max_norm=0.05, speculate=False, bucket_params=3000, gpu_assist=1.0)
    engine = heavylift.initialize(model=tiny_model(), config=engine_config(case))[0]
    for step in range(3):
        ids = batches(step, 0, 1)[0]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    engine.pipeline.wait_all()
    assist = engine.pipeline._assist
    assert engine.pipeline.stats["assisted"] > 0 and assist.link_bytes > 0
    host_params = sum(s.grad.numel() for b in engine.buckets if b.on_host for s in b.slots)
    assert engine.pipeline.stats["assisted"] == 3 * sum(b.on_host for b in engine.buckets)  # every bucket, every step
    assert assist.link_bytes == 3 * host_params * (2 * 12 + 4)  # fp32 state up and down, the fp32 slot up
    engine.close()
