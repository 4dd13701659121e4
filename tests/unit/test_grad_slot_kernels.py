"""Every format's native kernel reading a bf16 gradient slot (offload.grad_slot bf16): bitwise what it
computes from the same gradient widened to fp32 (the widening is exact and the arithmetic after the load is
the same), in place and out of place, and within the float64 reference's bounds (those of each format's
own test file) when the reference is fed the same bf16 gradient."""

import pytest
import torch

from heavylift.optim import native
from heavylift.optim.adamw import AdamWHyper
from heavylift.optim.compact import (adamw_math, bf16_master_int8_step, bf16_master_step, int8_moments_step,
                                    split_bf16)
from heavylift.optim.formats import FORMATS, master_fp32, native_step
from heavylift.optim.quant import quantize_m, quantize_r

kernel = native.load()
pytestmark = pytest.mark.skipif(kernel is None, reason=f"native kernel unavailable: {native.failure()}")
ROWS, ROW_LEN = 37, 541  # 20,017 elements: no multiple of a vector width; ragged int8 blocks
HP = AdamWHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
ULP = 2.0**-24


def _state(fmt: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = ROWS * ROW_LEN
    p, m, r = torch.randn(n, generator=gen) * 0.02, torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-3
    if fmt == "fp32":
        return dict(master=p, exp_avg=m, exp_avg_sq=r * r)
    if fmt == "bf16-moments":
        return dict(master=p, exp_avg=m.bfloat16(), exp_avg_sq=(r * r).bfloat16())
    if fmt == "bf16-master":
        hi, lo = split_bf16(p)
        return dict(master=hi, master_comp=lo, exp_avg=m.bfloat16(), exp_avg_sq=(r * r).bfloat16())
    mq, ms = quantize_m(m, ROW_LEN)
    rq, rs = quantize_r(r, ROW_LEN)
    if fmt == "bf16-master-int8":
        p = p.bfloat16()
    return dict(master=p, exp_avg=mq, exp_avg_scale=ms, exp_avg_sq=rq, exp_avg_sq_scale=rs)


def _grad(seed: int) -> torch.Tensor:
    g = torch.randn(ROWS * ROW_LEN, generator=torch.Generator().manual_seed(seed)) * 1e-3
    g[ROW_LEN: ROW_LEN + 7] *= 1e3  # outliers set their int8 blocks' scales
    return g.bfloat16()


def _reference(fmt: str, src: dict, g: torch.Tensor, step: int, grad_mul: float) -> dict:
    ref = {k: torch.empty_like(t) for k, t in src.items()}
    if fmt == "int8-moments":
        int8_moments_step(src, ref, g, HP, step, grad_mul, ROW_LEN, dtype=torch.float64)
    elif fmt == "bf16-master":
        bf16_master_step(src, ref, g, HP, step, grad_mul, dtype=torch.float64)
    elif fmt == "bf16-master-int8":  # the same random bits as the kernel's (stream key 0, offset 0)
        bf16_master_int8_step(src, ref, g, HP, step, grad_mul, ROW_LEN, dtype=torch.float64)
    else:
        p, m, v, _ = adamw_math(src["master"].double(), src["exp_avg"].double(), src["exp_avg_sq"].double(),
                                g.double() * grad_mul, HP, step)
        ref.update(master=p.float(), exp_avg=m.to(ref["exp_avg"].dtype), exp_avg_sq=v.to(ref["exp_avg_sq"].dtype))
        ref["_p64"] = p
    return ref


def _check_against_reference(fmt: str, src: dict, out: dict, ref: dict, g: torch.Tensor, grad_mul: float) -> None:
    g = g.double() * grad_mul
    int8 = fmt in ("int8-moments", "bf16-master-int8")
    if not int8:  # what fp32 rounding is relative to (m may cancel)
        mags = {"exp_avg": src["exp_avg"].double().abs() * HP.beta1 + g.abs() * (1 - HP.beta1),
                "exp_avg_sq": src["exp_avg_sq"].double() * HP.beta2 + g * g * (1 - HP.beta2)}
    p0 = master_fp32(src).double()
    p_ref = ref.pop("_p64", None)
    p_ref = master_fp32(ref).double() if p_ref is None else p_ref
    update = (p_ref - p0 * (1 - HP.lr * HP.weight_decay)).abs()
    err = (master_fp32(out).double() - p_ref).abs()
    if fmt == "bf16-moments":  # 2 ulp of p plus a 1e-5 share of lr (test_state_formats.py)
        assert (err <= 1e-5 * HP.lr + p_ref.abs() * 2.4e-7).all()
    elif fmt == "bf16-master":  # the compensation's own bf16 rounding (test_bf16_master.py)
        assert (err <= p_ref.abs() * 2.0**-15 + (p0.abs() + update) * 2.0**-21).all()
    elif fmt == "bf16-master-int8":  # the same bf16 neighbour, but where fp32 rounding crosses the threshold
        assert (out["master"] != ref["master"]).float().mean() < 1e-3
        assert (err <= p_ref.abs() * 2.0**-7).all()
    else:  # fp32 arithmetic on the same inputs (test_int8_moments.py's 32 ulps cover every format)
        assert (err <= 32 * ULP * (p0.abs() + update)).all()
    for k in ("exp_avg", "exp_avg_sq"):
        if int8:  # codes: neighbours at most, and rarely
            d = (out[k].int() - ref[k].int()).abs()
            assert d.max() <= 1 and (d > 0).float().mean() < 1e-3, k
        elif fmt == "fp32":  # fp32 rounding of the inputs' magnitudes (m may cancel)
            assert ((out[k].double() - ref[k].double()).abs() <= mags[k] * 4 * ULP + 1e-30).all(), k
        else:  # bf16: the float64 value rounded, or its neighbour where fp32 rounding sits on a boundary
            bound = ref[k].double().abs() * 2.0**-7 + mags[k] * 2.0**-22 + 1e-30
            assert ((out[k].double() - ref[k].double()).abs() <= bound).all(), k


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_bf16_gradient_kernel(fmt):
    src = _state(fmt, seed=1)
    for step, grad_mul in ((1, 1.0), (2, 0.37), (3, 1.0)):
        g = _grad(seed=step)
        out = {k: torch.full_like(t, 7) for k, t in src.items()}
        native_step(kernel, FORMATS[fmt], src, out, g, HP, step, grad_mul, ROW_LEN)
        widened = {k: torch.full_like(t, 7) for k, t in src.items()}
        native_step(kernel, FORMATS[fmt], src, widened, g.float(), HP, step, grad_mul, ROW_LEN)
        assert all(torch.equal(out[k], widened[k]) for k in out), "bf16 gradient differs from the same one in fp32"
        inplace = {k: t.clone() for k, t in src.items()}
        native_step(kernel, FORMATS[fmt], inplace, inplace, g, HP, step, grad_mul, ROW_LEN)
        assert all(torch.equal(inplace[k], out[k]) for k in out), "in place differs from out of place"
        _check_against_reference(fmt, src, out, _reference(fmt, src, g, step, grad_mul), g, grad_mul)
        src = out


def test_out_of_place_vector_path_with_offset_buffers():
    """The fp32 kernel's AVX-512 streaming path starts at a 64-byte boundary of the output: outputs offset
    by one element make it run a scalar head first; a bf16 gradient must give the same bits there too."""
    n = 4099
    src = _state("fp32", seed=3)
    src = {k: t[:n] for k, t in src.items()}
    g = _grad(seed=9)[1: n + 1]
    outs = [torch.empty(n + 1)[1:] for _ in range(3)]
    wide = [torch.empty(n + 1)[1:] for _ in range(3)]
    args = (HP.lr, HP.beta1, HP.beta2, HP.eps, HP.weight_decay, 4, 0.5)
    kernel.adamw_step(src["master"], src["exp_avg"], src["exp_avg_sq"], g, *outs, *args)
    kernel.adamw_step(src["master"], src["exp_avg"], src["exp_avg_sq"], g.float(), *wide, *args)
    assert all(torch.equal(a, b) for a, b in zip(outs, wide))


def test_kernel_refuses_other_gradient_dtypes():
    st = _state("fp32", seed=0)
    with pytest.raises(RuntimeError, match="grad must be a contiguous Float"):
        kernel.adamw_step(st["master"], st["exp_avg"], st["exp_avg_sq"], _grad(0).half(),
                          st["master"], st["exp_avg"], st["exp_avg_sq"], 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 1.0)
