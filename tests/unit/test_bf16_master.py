"""bf16-master: the native kernel against the float64 reference of the same math (optim/compact.py), and
the Kahan compensation doing its job: updates far below a bf16 ulp still add up.

Bounds: the kernel computes in fp32 what the reference computes in float64, so the bf16 weight and
moments agree but where a value is within fp32 rounding of a bf16 rounding boundary, and the master
``p + c`` within 2^-15 of its value (the compensation's own bf16 rounding) plus 2^-21 of the inputs."""

import pytest
import torch

from heavylift.optim import native
from heavylift.optim.adamw import AdamWHyper
from heavylift.optim.compact import adamw_math, bf16_master_step, split_bf16
from heavylift.optim.formats import FORMATS, master_fp32, native_step

kernel = native.load()
pytestmark = pytest.mark.skipif(kernel is None, reason=f"native kernel unavailable: {native.failure()}")
FMT = FORMATS["bf16-master"]


def _state(n: int, scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hi, lo = split_bf16(torch.randn(n, generator=g) * 0.02)
    m = torch.randn(n, generator=g) * 1e-3 * scale
    v = torch.rand(n, generator=g) * 1e-6 * scale**2
    m[:100] = 0
    v[:100] = 0
    return dict(master=hi, master_comp=lo, exp_avg=m.bfloat16(), exp_avg_sq=v.bfloat16())


@pytest.mark.parametrize("scale", [1.0, 1e-9, 1e4])
def test_kernel_matches_float64_reference_over_steps(scale):
    n = 50_003  # not a multiple of any vector width
    src = _state(n, scale, seed=1)
    for step in range(1, 6):
        g = torch.randn(n, generator=torch.Generator().manual_seed(step)) * 1e-3 * scale
        g[:100] = 0
        hp = AdamWHyper(lr=1e-3 * step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1 * (step % 2))
        grad_mul = 1.0 if step % 3 else 0.37
        out = {k: torch.full_like(t, 7) for k, t in src.items()}
        native_step(kernel, FMT, src, out, g, hp, step, grad_mul, 1)
        ref = {k: torch.empty_like(t) for k, t in src.items()}
        bf16_master_step(src, ref, g, hp, step, grad_mul, 1, dtype=torch.float64)
        for k in ("master", "exp_avg", "exp_avg_sq"):
            assert (out[k] != ref[k]).float().mean() < 1e-3, k
        e0, e_ref = master_fp32(src).double(), master_fp32(ref).double()
        update = (e_ref - e0 * (1 - hp.lr * hp.weight_decay)).abs()
        err = (master_fp32(out).double() - e_ref).abs()
        assert (err <= e_ref.abs() * 2.0**-15 + (e0.abs() + update) * 2.0**-21).all()
        inplace = {k: t.clone() for k, t in src.items()}
        native_step(kernel, FMT, inplace, inplace, g, hp, step, grad_mul, 1)
        assert all(torch.equal(inplace[k], out[k]) for k in out), "in place differs from out of place"
        src = out


def test_compensation_accumulates_updates_below_a_bf16_ulp():
    """Weights near 1 (bf16 ulp 2^-7), 200 steps of ~1e-4 each (under half an ulp): plain bf16 rounding
    would never move them; with the compensation they follow a float64 master stepped with the kernel's
    own (bf16) moments. The compensation is itself rounded to bf16 each step (up to 2^-17 of the weight),
    and a push of one sign makes that loss systematic: 29 * 2^-16 measured after 200 steps, bounded here
    at 2^-10 (4% of the distance moved; without the compensation the error is the whole distance)."""
    n, steps = 4096, 200
    p0 = 1 + torch.rand(n, dtype=torch.float64) * 0.5
    hi, lo = split_bf16(p0.float())
    state = dict(master=hi, master_comp=lo, exp_avg=torch.zeros(n, dtype=torch.bfloat16),
                 exp_avg_sq=torch.zeros(n, dtype=torch.bfloat16))
    exact = master_fp32(state).double()
    hp = AdamWHyper(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        g = 1 + 0.1 * torch.randn(n, generator=gen)  # a steady push: each step moves ~lr
        m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()  # what the kernel reads
        native_step(kernel, FMT, state, state, g, hp, step, 1.0, 1)
        exact = adamw_math(exact, m, v, g.double(), hp, step)[0]
    moved = p0 - exact
    assert moved.min() > 0.9 * steps * hp.lr  # moved ~0.02: several bf16 ulps, in steps of < half an ulp
    assert ((master_fp32(state).double() - exact).abs() <= exact * 2.0**-10).all()
    assert ((state["master"].double() - exact).abs() <= exact * (2.0**-8 + 2.0**-10)).all()  # p: e rounded
    naive = p0.bfloat16()
    for _ in range(steps):  # the same updates added to a plain bf16 weight are lost
        naive = (naive.double() - hp.lr).bfloat16()
    assert torch.equal(naive, p0.bfloat16())


def test_split_bf16_keeps_16_significant_bits():
    x = torch.randn(100_000) * torch.logspace(-8, 8, 100_000)
    hi, lo = split_bf16(x)
    assert torch.equal(hi, x.bfloat16())
    assert ((hi.double() + lo.double() - x.double()).abs() <= x.double().abs() * 2.0**-16).all()


def test_write_master_splits_in_chunks_to_the_same_bits(monkeypatch):
    """The store splits a bf16 master pair chunk by chunk (a whole 778 M-element embedding's split held 7 GiB
    of temporaries at init); every chunk boundary gives the bits of the whole tensor's split."""
    from heavylift.offload import store

    monkeypatch.setattr(store, "SPLIT_CHUNK", 1000)
    value = torch.randn(37, 101) * 3.0  # 3737 elements: three whole chunks and a ragged one
    slot = store.Slot(spec=None, state={"master": torch.empty(37, 101, dtype=torch.bfloat16),
                                        "master_comp": torch.empty(37, 101, dtype=torch.bfloat16)},
                      grad=torch.empty(0), step=torch.zeros(()))
    store.write_master(slot, value)
    hi, lo = split_bf16(value)
    assert torch.equal(slot.state["master"], hi) and torch.equal(slot.state["master_comp"], lo)
