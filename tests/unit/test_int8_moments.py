"""int8-moments: the block codes (optim/quant.py), the native kernel against the float64 reference of the
same math (dequantize -> AdamW in float64 -> requantize, optim/compact.py), and that reference against
plain AdamW.

Bounds: the kernel computes in fp32 what the reference computes in float64 from the same codes, so
every code agrees except where a value sits within fp32 rounding of a rounding boundary (then the two
codes are neighbours), a scale within 2^-21 of the block's input magnitude, and the master weight
within 32 fp32 ulps of its value and of its update. A wrong coefficient, bias correction, block
boundary or code is off by whole codes in many places, or by a fraction of the update."""

import pytest
import torch

from heavylift.optim import native
from heavylift.optim.adamw import AdamWHyper
from heavylift.optim.compact import adamw_math, int8_moments_step
from heavylift.optim.formats import FORMATS, native_step
from heavylift.optim.quant import (BLOCK, E4M4_MAX_CODE, block_absmax, decode_e4m4, dequantize_m, dequantize_r,
                                   encode_e4m4, quantize_m, quantize_r, scale_shape)

kernel = native.load()
needs_kernel = pytest.mark.skipif(kernel is None, reason=f"native kernel unavailable: {native.failure()}")
FMT = FORMATS["int8-moments"]
ULP = 2.0**-24


def test_e4m4_codes():
    codes = torch.arange(E4M4_MAX_CODE + 1, dtype=torch.uint8)
    y = decode_e4m4(codes, torch.float64)
    assert y[0] == 0 and y[1] == 2.0**-15 and y[2] == 2.0**-15 * (1 + 1 / 16) and y[17] == 2.0**-14
    assert y[E4M4_MAX_CODE] == 1.0 and bool((y[1:] > y[:-1]).all())  # strictly increasing
    assert torch.equal(encode_e4m4(y), codes)  # every level round-trips
    assert encode_e4m4(torch.tensor([2.0**-20, 1e-30, 0.0], dtype=torch.float64)).tolist() == [1, 1, 0]
    # in range, the nearest level: relative error <= 2^-5 (half a step of a 4-bit mantissa)
    x = torch.exp2(torch.empty(100_000, dtype=torch.float64).uniform_(-15, 0))
    err = (decode_e4m4(encode_e4m4(x), torch.float64) - x).abs() / x
    assert err.max() <= 2.0**-5 and err.mean() < 2.0**-6


@pytest.mark.parametrize("row_len", [1, 7, BLOCK, 600])
def test_block_quantization_error(row_len):
    torch.manual_seed(0)
    rows = 30
    m = torch.randn(rows, row_len, dtype=torch.float64) * torch.logspace(-6, 2, rows, dtype=torch.float64)[:, None]
    m[3] = 0  # an all-zero row: zero scale, zero codes
    codes, scale = quantize_m(m, row_len)
    assert scale.shape == scale_shape(m.shape) == (rows, -(-row_len // BLOCK))
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127 and not codes[3].any() and not scale[3].any()
    step = scale.repeat_interleave(BLOCK, dim=1)[:, :row_len] / 127  # each element's block step
    assert ((dequantize_m(codes, scale, row_len, torch.float64) - m).abs() <= step / 2 * (1 + 1e-12)).all()
    r = m.abs()
    codes, scale = quantize_r(r, row_len)
    back = dequantize_r(codes, scale, row_len, torch.float64)
    top = scale.repeat_interleave(BLOCK, dim=1)[:, :row_len]
    inside = r >= top * 2.0**-15
    assert ((back - r).abs() <= r * 2.0**-5)[inside].all()
    assert (back[~inside & (r > 0)] == (top * 2.0**-15)[~inside & (r > 0)]).all()  # clamped up, never to 0


def _state(rows: int, row_len: int, scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = rows * row_len
    p = torch.randn(n, generator=g) * 0.02
    m = torch.randn(n, generator=g) * 1e-3 * scale
    r = torch.rand(n, generator=g) * 1e-3 * scale
    m[: row_len] = 0  # a row of zeros
    r[: row_len] = 0
    mq, ms = quantize_m(m, row_len)
    rq, rs = quantize_r(r, row_len)
    return dict(master=p, exp_avg=mq, exp_avg_scale=ms, exp_avg_sq=rq, exp_avg_sq_scale=rs)


def _grad(n: int, row_len: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e-3 * scale
    g[: row_len] = 0
    g[n // 3: n // 3 + 5] *= 1e3  # a few outliers set their blocks' scales
    return g


def _check_one_step(src, out, g, hp, step, grad_mul, row_len):
    ref = {k: torch.empty_like(t) for k, t in src.items()}
    int8_moments_step(src, ref, g, hp, step, grad_mul, row_len, dtype=torch.float64)
    for k in ("exp_avg", "exp_avg_sq"):
        d = (out[k].int() - ref[k].int()).abs()
        assert d.max() <= 1 and (d > 0).float().mean() < 1e-3, (k, d.max(), (d > 0).float().mean())
    m_old = dequantize_m(src["exp_avg"], src["exp_avg_scale"], row_len, torch.float64)
    mag = block_absmax(m_old.abs() * hp.beta1 + (g.double() * grad_mul).abs() * (1 - hp.beta1), row_len)
    assert ((out["exp_avg_scale"].double() - ref["exp_avg_scale"].double()).abs() <= mag * 2.0**-21).all()
    r_ref = ref["exp_avg_sq_scale"].double()
    assert ((out["exp_avg_sq_scale"].double() - r_ref).abs() <= r_ref * 4 * ULP).all()
    p0, p1 = src["master"].double(), ref["master"].double()
    update = (p1 - p0 * (1 - hp.lr * hp.weight_decay)).abs()
    assert ((out["master"].double() - p1).abs() <= 32 * ULP * (p0.abs() + update)).all()
    return ref


@needs_kernel
@pytest.mark.parametrize("rows,row_len", [(40, 600), (2000, 1), (12, BLOCK), (6, 1000)])
@pytest.mark.parametrize("scale", [1.0, 1e-9, 1e4])
def test_kernel_matches_float64_reference_over_steps(rows, row_len, scale):
    """Five steps, weight decay and gradient scaling (unscale/clip) on and off, hyper-parameters moving;
    each step checked against the reference from the kernel's own state, in place and out of place."""
    src = _state(rows, row_len, scale, seed=rows)
    for step in range(1, 6):
        g = _grad(rows * row_len, row_len, scale, seed=step)
        hp = AdamWHyper(lr=1e-3 * step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1 * (step % 2))
        grad_mul = 1.0 if step % 3 else 0.37
        out = {k: torch.full_like(t, 7) for k, t in src.items()}
        native_step(kernel, FMT, src, out, g, hp, step, grad_mul, row_len)
        _check_one_step(src, out, g, hp, step, grad_mul, row_len)
        inplace = {k: t.clone() for k, t in src.items()}
        native_step(kernel, FMT, inplace, inplace, g, hp, step, grad_mul, row_len)
        assert all(torch.equal(inplace[k], out[k]) for k in out), "in place differs from out of place"
        src = out


@needs_kernel
def test_kernel_trajectory_stays_with_the_reference():
    """Twenty steps each on its own state: the kernel's and the float64 reference's codes may part at a
    boundary and meet again; the weights stay together to 1e-4 of the total update."""
    rows, row_len = 64, 600
    k_state = _state(rows, row_len, 1.0, seed=5)
    r_state = {k: t.clone() for k, t in k_state.items()}
    p0 = k_state["master"].clone()
    hp = AdamWHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    for step in range(1, 21):
        g = _grad(rows * row_len, row_len, 1.0, seed=100 + step)
        native_step(kernel, FMT, k_state, k_state, g, hp, step, 1.0, row_len)
        int8_moments_step(r_state, r_state, g, hp, step, 1.0, row_len, dtype=torch.float64)
    total = (r_state["master"] - p0).norm()
    assert (k_state["master"] - r_state["master"]).norm() <= 1e-4 * total


def test_reference_is_adamw_with_moments_rounded_after_the_step():
    """The reference's new weight is plain float64 AdamW on the dequantized moments (the update uses the
    new moments before they are quantized); only the stored moments carry the quantization error."""
    rows, row_len = 20, 600
    src = _state(rows, row_len, 1.0, seed=3)
    g = _grad(rows * row_len, row_len, 1.0, seed=4)
    hp = AdamWHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    out = {k: torch.empty_like(t) for k, t in src.items()}
    int8_moments_step(src, out, g, hp, 3, 1.0, row_len, dtype=torch.float64)
    m = dequantize_m(src["exp_avg"], src["exp_avg_scale"], row_len, torch.float64)
    r = dequantize_r(src["exp_avg_sq"], src["exp_avg_sq_scale"], row_len, torch.float64)
    p, m, v, _ = adamw_math(src["master"].double(), m, r * r, g.double(), hp, 3)
    assert ((out["master"].double() - p).abs() <= p.abs() * ULP).all()  # fp32 storage of the same value
    m_back = dequantize_m(out["exp_avg"], out["exp_avg_scale"], row_len, torch.float64)
    step = out["exp_avg_scale"].double().repeat_interleave(BLOCK, 1)[:, :row_len].reshape(-1) / 127
    assert ((m_back - m).abs() <= step / 2 * 1.0001).all()
    r_back = dequantize_r(out["exp_avg_sq"], out["exp_avg_sq_scale"], row_len, torch.float64)
    inside = v.sqrt() >= out["exp_avg_sq_scale"].double().repeat_interleave(BLOCK, 1)[:, :row_len].reshape(-1) / 2**15
    assert ((r_back - v.sqrt()).abs() <= v.sqrt() * 2.0**-5 * 1.0001)[inside].all()


@needs_kernel
def test_kernel_refuses_wrong_shapes():
    src = _state(4, 300, 1.0, seed=0)
    g = torch.zeros(4 * 300)
    hp = AdamWHyper(1e-3, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(RuntimeError, match="row_len"):
        native_step(kernel, FMT, src, src, g, hp, 1, 1.0, 7)
    with pytest.raises(RuntimeError, match="ms_in"):
        native_step(kernel, FMT, src, src, g, hp, 1, 1.0, 600)
