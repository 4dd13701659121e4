"""bf16-master-int8: the native kernel against the float64 reference (optim/compact.py, the same random bits
from optim/stochastic.py), stochastic rounding doing its job (unbiased: updates far below a bf16 ulp add up
in expectation), and its random bits depending only on (element, step, key).

Bounds: the reference steps in float64, rounds the new master to fp32 and then stochastically to bf16 with
the kernel's bits; the kernel computes the fp32 value in fp32. So the two bf16 masters are equal but where
the fp32 values straddle the random threshold (a few fp32 ulps out of a bf16 ulp's 2^16: rare), and every
kernel master is one of the two bf16 neighbours of the float64 value. The moments are int8-moments' codes
(neighbours at most, rarely; test_int8_moments.py has the rest)."""

import pytest
import torch

from heavylift.optim import native
from heavylift.optim.adamw import AdamWHyper
from heavylift.optim.compact import adamw_math, bf16_master_int8_step
from heavylift.optim.formats import FORMATS, moments_fp32, native_step
from heavylift.optim.quant import BLOCK, dequantize_m, dequantize_r, quantize_m, quantize_r
from heavylift.optim.stochastic import round_bf16_stochastic, stream_key

kernel = native.load()
pytestmark = pytest.mark.skipif(kernel is None, reason=f"native kernel unavailable: {native.failure()}")
FMT = FORMATS["bf16-master-int8"]
SR = (stream_key(0, "w"), 3 * 600)  # a shard starting at row 3 of its parameter


def _state(rows: int, row_len: int, scale: float, seed: int, p: torch.Tensor | None = None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = rows * row_len
    p = torch.randn(n, generator=gen) * 0.02 if p is None else p
    m, r = torch.randn(n, generator=gen) * 1e-3 * scale, torch.rand(n, generator=gen) * 1e-3 * scale
    m[:row_len], r[:row_len] = 0, 0  # a row of zeros
    (mq, ms), (rq, rs) = quantize_m(m, row_len), quantize_r(r, row_len)
    return dict(master=p.bfloat16(), exp_avg=mq, exp_avg_scale=ms, exp_avg_sq=rq, exp_avg_sq_scale=rs)


def _grad(n: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e-3 * scale
    g[n // 3: n // 3 + 5] *= 1e3  # outliers set their blocks' scales
    return g


def _float64_master(src: dict, g: torch.Tensor, hp: AdamWHyper, step: int, grad_mul: float, row_len: int):
    m = dequantize_m(src["exp_avg"], src["exp_avg_scale"], row_len, torch.float64)
    r = dequantize_r(src["exp_avg_sq"], src["exp_avg_sq_scale"], row_len, torch.float64)
    return adamw_math(src["master"].double(), m, r * r, g.double() * grad_mul, hp, step)[0]


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones_like(x), torch.frexp(x)[1] - 8)  # |x| in [2^(e-1), 2^e): ulp 2^(e-8)


@pytest.mark.parametrize("rows,row_len", [(40, 600), (600, 1), (6, 1000)])
@pytest.mark.parametrize("scale", [1.0, 1e-9, 1e4])
def test_kernel_matches_float64_reference_over_steps(rows, row_len, scale):
    src = _state(rows, row_len, scale, seed=rows)
    for step in range(1, 6):
        g = _grad(rows * row_len, scale, seed=step)
        hp = AdamWHyper(lr=1e-3 * step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1 * (step % 2))
        grad_mul = 1.0 if step % 3 else 0.37
        out = {k: torch.full_like(t, 7) for k, t in src.items()}
        native_step(kernel, FMT, src, out, g, hp, step, grad_mul, row_len, SR)
        ref = {k: torch.empty_like(t) for k, t in src.items()}
        bf16_master_int8_step(src, ref, g, hp, step, grad_mul, row_len, dtype=torch.float64, sr=SR)
        assert (out["master"] != ref["master"]).float().mean() < 1e-3
        p64 = _float64_master(src, g, hp, step, grad_mul, row_len)
        for p in (out["master"], ref["master"]):  # one of p64's two bf16 neighbours
            assert ((p.double() - p64).abs() < _bf16_ulp(p64)).all()
        for k in ("exp_avg", "exp_avg_sq"):
            d = (out[k].int() - ref[k].int()).abs()
            assert d.max() <= 1 and (d > 0).float().mean() < 1e-3, k
        inplace = {k: t.clone() for k, t in src.items()}
        native_step(kernel, FMT, inplace, inplace, g, hp, step, grad_mul, row_len, SR)
        assert all(torch.equal(inplace[k], out[k]) for k in out), "in place differs from out of place"
        src = out


def test_rounding_is_unbiased_and_exact_on_the_grid():
    """Values a fraction f of a bf16 ulp above a bf16 number round up with probability f; bf16 values
    themselves are never moved; NaN stays NaN, infinities stay."""
    n = 1 << 16
    bits = torch.randint(0, 1 << 32, (n,), dtype=torch.int64, generator=torch.Generator().manual_seed(1))
    for f in (0.01, 0.3, 0.75):
        x = torch.full((n,), 1 + f * 2.0**-7)
        up = (round_bf16_stochastic(x, bits).float() > 1).double().mean()
        assert abs(up - f) < 5 * (f * (1 - f) / n) ** 0.5
    grid = torch.randn(n).bfloat16()
    assert torch.equal(round_bf16_stochastic(grid.float(), bits), grid)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    out = round_bf16_stochastic(special, bits[:5]).float()
    assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf") and (out[3:] == 0).all()


def test_updates_far_below_a_bf16_ulp_accumulate_in_expectation():
    """Weights in [1, 1.5) (bf16 ulp 2^-7), 200 steps of ~1e-4 each (1/78 of an ulp): round to nearest would
    never move them; stochastic rounding moves each by the float64 master's distance (stepped with the
    kernel's own moments) plus a zero-mean error. Per element that error is a random walk of ~1.6 ulps
    after 200 steps (variance ~ulp^2 * f per step); over 4096 elements its mean is ~0.025 ulp."""
    n, steps = 4096, 200
    p0 = 1 + torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5
    state = _state(1, n, 0.0, seed=0, p=p0.float())
    exact = state["master"].double()
    hp = AdamWHyper(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        g = 1 + 0.1 * torch.randn(n, generator=gen)  # a steady push: each step moves ~lr
        m, v = moments_fp32(state, n)  # what the kernel reads
        native_step(kernel, FMT, state, state, g, hp, step, 1.0, n, (12345, 0))
        exact = adamw_math(exact, m.double(), v.double(), g.double(), hp, step)[0]
    ulp = 2.0**-7
    moved = state["master"].double().mean() - p0.bfloat16().double().mean()
    err = state["master"].double() - exact
    print(f"moved {moved / ulp:.3f} ulp, error mean {err.mean() / ulp:.4f} std {err.std() / ulp:.3f} max {err.abs().max() / ulp:.2f} ulp")
    assert moved < -0.9 * steps * hp.lr  # ~2.5 ulps moved on average, each step < 1/50 of an ulp
    assert abs(err.mean()) < 0.15 * ulp  # unbiased: < 6% of the distance moved
    assert err.abs().max() < 12 * ulp and 0.5 * ulp < err.std() < 3 * ulp  # the noise it pays for it
    naive = p0.bfloat16()
    assert torch.equal((naive.float() - 1e-4).bfloat16(), naive)  # round to nearest loses such a step


def test_random_bits_depend_only_on_element_step_and_key():
    """Same (key, step, offset): the same bits whatever the thread count or how the shard is cut into calls
    (each part with its own offset); another step or key: other bits."""
    rows, row_len, step = 64, 600, 7
    src = _state(rows, row_len, 1.0, seed=3)
    g = _grad(rows * row_len, 1.0, seed=4)
    hp = AdamWHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)

    def run(state, grad, sr, threads=None, step=step):
        out = {k: torch.empty_like(t) for k, t in state.items()}
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            native_step(kernel, FMT, state, out, grad, hp, step, 1.0, row_len, sr)
        finally:
            torch.set_num_threads(before)
        return out["master"]

    whole = run(src, g, SR, threads=1)
    assert torch.equal(whole, run(src, g, SR, threads=2))
    half = rows // 2
    lo = {k: t.reshape(rows, -1)[:half].reshape(-1) for k, t in src.items()}
    hi = {k: t.reshape(rows, -1)[half:].reshape(-1) for k, t in src.items()}
    n = half * row_len
    parts = torch.cat([run(lo, g[:n], SR), run(hi, g[n:], (SR[0], SR[1] + n))])
    assert torch.equal(parts, whole)
    for other in (run(src, g, SR, step=step + 1), run(src, g, (SR[0] + 1, SR[1]))):
        assert 0.05 < (other != whole).float().mean() < 0.9  # rounds differently where the bits matter


def test_kernel_refuses_bad_stream_arguments():
    src = _state(2, BLOCK, 1.0, seed=0)
    g = torch.zeros(2 * BLOCK)
    hp = AdamWHyper(1e-3, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(RuntimeError, match="key"):
        native_step(kernel, FMT, src, src, g, hp, 1, 1.0, BLOCK, (1 << 32, 0))
    with pytest.raises(RuntimeError, match="offset"):
        native_step(kernel, FMT, src, src, g, hp, 1, 1.0, BLOCK, (0, -1))
    with pytest.raises(RuntimeError, match="p_in"):
        native_step(kernel, FMT, dict(src, master=src["master"].float()), src, g, hp, 1, 1.0, BLOCK, (0, 0))
