"""fp16 with dynamic loss scaling (overflowing steps skipped exactly, scale lowered), the loss-scale
state machine, and the host-memory preflight that refuses before allocating."""

import pytest
import torch

import heavylift
from heavylift.config import EngineConfig, HeavyliftError
from heavylift.config.schema import PrecisionConfig
from heavylift.optim.loss_scale import LossScaler
from support.equivalence import batches, snapshot_state, tiny_model


def test_loss_scaler_halves_after_hysteresis_and_grows_after_window():
    s = LossScaler.from_config(PrecisionConfig(dtype="fp16", initial_scale_power=4, loss_scale_window=3,
                                               hysteresis=2, min_loss_scale=2.0))
    assert s.scale == 16.0 and s.dynamic
    s.update(found_inf=True)
    assert s.scale == 16.0  # first overflow absorbed by hysteresis
    s.update(found_inf=True)
    assert s.scale == 8.0
    for _ in range(3):
        s.update(found_inf=False)
    assert s.scale == 16.0
    for _ in range(10):
        s.update(found_inf=True)
    assert s.scale == 2.0  # never below min_loss_scale
    assert LossScaler.from_config(PrecisionConfig(dtype="bf16")).scale == 1.0
    static = LossScaler.from_config(PrecisionConfig(dtype="fp16", loss_scale=128.0))
    static.update(found_inf=True)
    assert static.scale == 128.0


def test_fp16_overflow_steps_are_skipped_exactly_then_training_proceeds():
    ec = EngineConfig()
    ec.precision.dtype = "fp16"
    ec.precision.initial_scale_power = 40  # loss * 2^40 overflows fp16 at once
    ec.precision.hysteresis = 1
    ec.optim.lr, ec.optim.max_grad_norm = 3e-3, 1.0
    ec.activation_checkpointing = False
    engine = heavylift.initialize(model=tiny_model(), config=ec)[0]
    skipped, losses = [], []
    for step in range(30):
        before = snapshot_state(engine)
        (ids,) = batches(step, 0, 1)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        skipped.append(engine.last_step.skipped)
        after = snapshot_state(engine)
        if engine.last_step.skipped:
            assert all(torch.equal(a, b) for a, b in zip(before, after)), f"step {step} skipped but state changed"
        else:
            assert not all(torch.equal(a, b) for a, b in zip(before, after))
    assert skipped[0] and not skipped[-1]
    assert engine.scaler.scale < 2.0**40
    assert engine.skipped_steps == sum(skipped)
    assert engine.lr_scheduler.last_epoch == 30 - sum(skipped)  # the schedule does not advance on a skip
    engine.close()


def test_preflight_refuses_before_allocating(monkeypatch):
    import heavylift.offload.preflight as pf

    import heavylift.engine as engine_module
    import heavylift.engine_placement as eng

    monkeypatch.setattr(pf, "mem_available_bytes", lambda: 1024)
    monkeypatch.setattr(eng, "mem_available_bytes", lambda: 1024)
    allocated = []

    real = engine_module.allocate_bucket
    monkeypatch.setattr(engine_module, "allocate_bucket", lambda *a, **k: allocated.append(1) or real(*a, **k))
    with pytest.raises(HeavyliftError, match="GiB of host RAM"):
        heavylift.initialize(model=tiny_model(), config=EngineConfig())
    assert not allocated


def test_pinned_limit_error_names_the_fix(monkeypatch):
    import resource

    import heavylift.offload.preflight as pf

    monkeypatch.setattr(resource, "getrlimit", lambda _: (1 << 20, 1 << 20))
    with pytest.raises(HeavyliftError, match="ulimit -l"):
        pf.check_host_memory(host_bytes=10, pinned_bytes=1 << 30, pin=True)


def test_speculation_snapshot_dropped_when_it_does_not_fit(monkeypatch):
    import heavylift.engine_placement as eng
    import heavylift.offload.preflight as pf

    n = sum(p.numel() for p in tiny_model().parameters())
    avail = n * 20  # room for the 16 B/param state, not for the 12 B/param snapshot on top
    monkeypatch.setattr(pf, "mem_available_bytes", lambda: avail)
    monkeypatch.setattr(eng, "mem_available_bytes", lambda: avail)
    engine = heavylift.initialize(model=tiny_model(), config=EngineConfig())[0]
    assert not engine.pipeline.speculate
    assert all("snap_master" not in b.flats for b in engine.buckets)
    engine.close()


def test_node_need_counts_every_local_rank():
    import heavylift.offload.preflight as pf

    pf.check_host_memory(host_bytes=10 * 2**30, pinned_bytes=0, pin=False, ranks_per_node=1, available=15 * 2**30)
    with pytest.raises(HeavyliftError, match=r"2 ranks x 10.0 GiB"):
        pf.check_host_memory(host_bytes=10 * 2**30, pinned_bytes=0, pin=False, ranks_per_node=2,
                             available=15 * 2**30)
