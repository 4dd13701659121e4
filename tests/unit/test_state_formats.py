"""Compact optimizer state: the bf16-moments kernel against a float64 reference, and the engine
trained with it against exact AdamW (its error is measured and bounded, not zero)."""

import pytest
import torch

from heavylift.config import ConfigError
from heavylift.optim import native
from support.equivalence import Case, engine_config, run_case, tiny_model

kernel = native.load()
pytestmark = pytest.mark.skipif(kernel is None, reason=f"native kernel unavailable: {native.failure()}")


@pytest.mark.parametrize("grad_mul,wd", [(1.0, 0.0), (0.37, 0.1)])
def test_bf16_moments_kernel_matches_float64_reference(grad_mul, wd):
    torch.manual_seed(0)
    n = 100_003  # not a multiple of any vector width
    p = torch.randn(n) * 0.02
    m = (torch.randn(n) * 1e-3).bfloat16()
    v = (torch.rand(n) * 1e-6).bfloat16()
    g = torch.randn(n) * 1e-3
    po, mo, vo = torch.empty_like(p), torch.empty_like(m), torch.empty_like(v)
    lr, b1, b2, eps, step = 1e-3, 0.9, 0.999, 1e-8, 7
    kernel.adamw_step_bf16_moments(p, m, v, g, po, mo, vo, lr, b1, b2, eps, wd, step, grad_mul)
    P, M, V, G = p.double(), m.double(), v.double(), g.double() * grad_mul
    M2 = M * b1 + G * (1 - b1)
    V2 = V * b2 + G * G * (1 - b2)
    P2 = P * (1 - lr * wd) - lr / (1 - b1**step) * M2 / (V2.sqrt() / (1 - b2**step) ** 0.5 + eps)
    # the moments are the float64 values rounded to bf16, up to fp32 rounding before the final rounding
    assert (mo == M2.bfloat16()).float().mean() > 0.9999
    assert (vo == V2.bfloat16()).float().mean() > 0.9999
    assert ((mo.double() - M2).abs() <= M2.abs() * 2**-8 + 1e-30).all()
    # the master weight is fp32 arithmetic on the same inputs: within 2 ulp of p plus a 1e-5 share of lr
    assert ((po.double() - P2).abs() <= 1e-5 * lr + P2.abs() * 2.4e-7).all()  # 2 ulp of p + 1e-5 of lr
    # in place gives the same bits as out of place
    pi, mi, vi = p.clone(), m.clone(), v.clone()
    kernel.adamw_step_bf16_moments(pi, mi, vi, g, pi, mi, vi, lr, b1, b2, eps, wd, step, grad_mul)
    assert torch.equal(pi, po) and torch.equal(mi, mo) and torch.equal(vi, vo)


def test_fp32_kernel_in_and_out_of_place_agree():
    torch.manual_seed(1)
    n = 70_001
    p, m, v, g = torch.randn(n) * 0.02, torch.randn(n) * 1e-3, torch.rand(n) * 1e-6, torch.randn(n) * 1e-3
    outs = [torch.empty(n) for _ in range(3)]
    kernel.adamw_step(p, m, v, g, *outs, 1e-3, 0.9, 0.999, 1e-8, 0.1, 3, 0.5)
    pi, mi, vi = p.clone(), m.clone(), v.clone()
    kernel.adamw_step(pi, mi, vi, g, pi, mi, vi, 1e-3, 0.9, 0.999, 1e-8, 0.1, 3, 0.5)
    assert torch.equal(pi, outs[0]) and torch.equal(mi, outs[1]) and torch.equal(vi, outs[2])


@pytest.mark.parametrize("case", [
    Case("fp32_clip", max_norm=1.0, weight_decay=0.1, schedule="warmup_cosine"),
    Case("bf16m_clip", max_norm=1.0, weight_decay=0.1, schedule="warmup_cosine", state_format="bf16-moments"),
    Case("bf16m_spec_nan", max_norm=0.0, state_format="bf16-moments", nan_step=5, steps=12),
    Case("bf16m_tail_grows", max_norm=1.0, state_format="bf16-moments", ratio=0.5, grow_tail_at=6, steps=12),
], ids=lambda c: c.name)
def test_bf16_moments_training_stays_close_to_exact_adamw(case):
    r = run_case(case)
    print(f"{case.name}: relative update error {r['rel_update_error']:.2e} over {case.steps} steps")
    # measured 1.4e-3 to 2.6e-3 for bf16 moments (docs/state-formats.md); a lost step or a wrong moment is ~1
    assert r["rel_update_error"] < 1e-2, r["rel_update_error"]
    for mine, theirs in r["skipped"]:
        assert mine == theirs
    if case.nan_step >= 0:
        assert r["skip_bit_identical"]
        assert r["stats"]["speculated"] > 0 and r["stats"]["undone"] > 0


def test_host_moments_are_bf16_and_tail_stays_fp32():
    import heavylift

    engine = heavylift.initialize(model=tiny_model(), config=engine_config(
        Case("x", ratio=0.5, state_format="bf16-moments")))[0]
    assert {b.flats["exp_avg"].dtype for b in engine.buckets if b.on_host} == {torch.bfloat16}
    assert {b.flats["exp_avg"].dtype for b in engine.buckets if not b.on_host} == {torch.float32}
    engine.close()


def test_compact_state_refuses_the_torch_kernel():
    import heavylift

    with pytest.raises(ConfigError, match="offload.kernel"):
        heavylift.initialize(model=tiny_model(), config=engine_config(
            Case("x", state_format="bf16-moments", kernel="torch")))
