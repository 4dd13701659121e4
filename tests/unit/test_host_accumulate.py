"""offload.accumulate host (one rank, CPU): summing each micro-batch's gradient in the host slot trains
bit for bit as FSDP2's summing on the device does (clip redo, skip, GPU-tail buckets beside host ones,
parameters that get no gradient), matches torch.optim.AdamW with accumulation, and is refused where the
slot cannot hold the compute dtype's sums."""

import dataclasses

import pytest

from support.equivalence import Case, run_case, train_state
from support.tolerance import check

CASES = [
    Case("fp32_accum3_clip_skip", max_norm=0.05, lr=1e-2, grad_accum=3, nan_step=2, steps=5, bucket_params=3000),
    Case("fp32_accum2_tail_decay", max_norm=1.0, grad_accum=2, weight_decay=0.1, ratio=0.5, steps=4,
         bucket_params=3000, speculate=False),
    Case("bf16_accum3_clip", dtype="bf16", max_norm=0.05, lr=1e-2, grad_accum=3, steps=4, bucket_params=3000),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_host_sums_train_bit_for_bit_as_device_sums(case):
    device = train_state(case)
    host = train_state(dataclasses.replace(case, accumulate="host"))
    assert host["norms"] == device["norms"]
    assert host["stats"] == device["stats"]
    assert len(host["state"]) == len(device["state"])
    assert all(a.dtype == b.dtype and (a == b).all() for a, b in zip(host["state"], device["state"]))
    if case.max_norm == 0.05:  # the clipped steps redo the buckets from the summed slot
        assert host["stats"]["redone"] > 0


def test_host_sums_match_torch_adamw_with_unused_parameters():
    """Parameters that get no gradient leave their bucket partial: it is sent at the end of each backward."""
    case = Case("accum3_unused", max_norm=1.0, grad_accum=3, unused_param=True, nan_step=1, steps=4,
                bucket_params=3000, accumulate="host")
    result = run_case(case, keep_state=True)
    check(result, case.steps, case.lr)
    assert result["skip_bit_identical"] and result["untouched_equal"]
    device = run_case(dataclasses.replace(case, accumulate="device"), keep_state=True)
    assert all((a == b).all() for a, b in zip(result["final_state"], device["final_state"]))


def test_host_sums_need_the_slot_in_the_compute_dtype():
    import heavylift
    from heavylift.config.errors import HeavyliftError
    from support.equivalence import engine_config, tiny_model

    case = Case("fp32_bf16_slot", grad_slot="bf16", grad_accum=2, accumulate="host")
    with pytest.raises(HeavyliftError, match="offload.grad_slot fp32 or offload.accumulate device"):
        heavylift.initialize(model=tiny_model(), config=engine_config(case))


def test_without_host_sums_leaves_the_slots_alone():
    """The benchmark's forward+backward alone runs micro-batches that never reach a boundary; with host
    sums paused their gradients stay with FSDP2 and no slot is written; unpaused, the slots take them."""
    import torch

    import heavylift
    from support.equivalence import batches, engine_config, tiny_model

    engine = heavylift.initialize(model=tiny_model(), config=engine_config(
        Case("pause", grad_accum=4, accumulate="host")))[0]
    (ids,) = batches(0, 0, 1)
    slots = [s.grad for b in engine.buckets if b.on_host for s in b.slots]
    with engine.pipeline.without_host_sums():
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    assert all(not g.any() for g in slots)
    assert any(p.grad is not None for p in engine.module.parameters())
    engine.module.zero_grad(set_to_none=True)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    assert any(g.any() for g in slots)
    assert all(p.grad is None for p in engine.module.parameters())  # the card let them go
    engine.close()


@pytest.mark.parametrize("where", ["device", "host"])
def test_a_parameter_used_only_in_earlier_micro_batches_is_stepped(where):
    """A parameter with a gradient from an earlier micro-batch but none from the window's last (a MoE expert
    the last tokens did not pick) steps with that sum, as torch's AdamW steps it; the sum does not leak
    into the next window."""
    case = Case("early_only", max_norm=1.0, grad_accum=3, unused_param=True, early_only=True, steps=4,
                bucket_params=3000, weight_decay=0.1, accumulate=where)
    result = run_case(case)
    check(result, case.steps, case.lr)


def test_estimate_refuses_host_sums_as_the_engine_does():
    from heavylift.config.errors import HeavyliftError
    from heavylift.memory import Setup, check_setup

    check_setup(Setup(accum=2, host_accumulate=True, compute_dtype="bf16", state_format="int8-moments"))
    with pytest.raises(HeavyliftError, match="offload.grad_slot fp32 or offload.accumulate device"):
        check_setup(Setup(accum=2, host_accumulate=True, compute_dtype="fp32", dtype_bytes=4,
                          state_format="int8-moments"))


@pytest.mark.parametrize("where", ["device", "host"])
def test_loading_a_checkpoint_mid_window_drops_that_windows_sums(tmp_path, where):
    """A checkpoint holds a step boundary: loading it into an engine that is part-way through a window must not
    carry that window's gradient sums (FSDP2's .grad, or the host slots' partial sums) into the next one."""
    import torch

    from heavylift.checkpoint import load, save
    from support.checkpointing import CASE, local_state, new_engine, train
    from support.equivalence import batches

    case = dataclasses.replace(CASE, accumulate=where, grad_accum=3)
    fresh = new_engine(case=case)
    train(fresh, range(2), case)
    save(fresh, tmp_path, "step-2")
    train(fresh, range(2, 4), case)
    want = local_state(fresh)
    fresh.close()

    busy = new_engine(case=case)
    train(busy, range(1), case)
    x = torch.cat(batches(9, 0, 2))
    busy.backward(busy(input_ids=x, labels=x).loss)  # one micro-batch of a window, not stepped
    busy.step()
    load(busy, tmp_path, "step-2")
    train(busy, range(2, 4), case)
    assert all(torch.equal(a, b) for a, b in zip(want, local_state(busy)))
    busy.close()
