"""GPU checks of the compact state formats (run on a GPU box; CI skips them): the GPU-tail step (torch
ops, fp32) and the CPU kernel against the float64 reference on the same state, and training with a
tail in each format against the fp32-master reference of test_gpu_engine.py."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _int8_state(rows, row_len):
    from heavylift.optim.quant import quantize_m, quantize_r

    g = torch.Generator().manual_seed(0)
    n = rows * row_len
    mq, ms = quantize_m(torch.randn(n, generator=g) * 1e-3, row_len)
    rq, rs = quantize_r(torch.rand(n, generator=g) * 1e-3, row_len)
    return dict(master=torch.randn(n, generator=g) * 0.02, exp_avg=mq, exp_avg_scale=ms, exp_avg_sq=rq,
                exp_avg_sq_scale=rs)


def _bf16_master_state(n):
    from heavylift.optim.compact import split_bf16

    g = torch.Generator().manual_seed(0)
    hi, lo = split_bf16(torch.randn(n, generator=g) * 0.02)
    return dict(master=hi, master_comp=lo, exp_avg=(torch.randn(n, generator=g) * 1e-3).bfloat16(),
                exp_avg_sq=(torch.rand(n, generator=g) * 1e-6).bfloat16())


def _errors(fmt, src, out, ref, hp, row_len):
    """Worst error of ``out`` against the float64 reference ``ref``, each in units of the unit tests'
    bound (<= 1 passes): codes/bf16 values that differ (at most 1 in 1e-3 of them, by one code), master
    within 32 fp32 ulps of its inputs (int8-moments) or 2^-15 of its value plus 2^-21 of its inputs
    (bf16-master: the compensation's own bf16 rounding)."""
    from heavylift.optim.formats import master_fp32

    worst = {}
    for k in out:
        if out[k].dtype in (torch.int8, torch.uint8, torch.bfloat16) and k != "master_comp":
            worst[k] = (out[k] != ref[k]).float().mean().item() / 1e-3
    e0, e_ref = master_fp32(src).double(), master_fp32(ref).double()
    update = (e_ref - e0 * (1 - hp.lr * hp.weight_decay)).abs()
    err = (master_fp32(out).double() - e_ref).abs()
    bound = (32 * 2.0**-24 * (e0.abs() + update) if fmt == "int8-moments"
             else e_ref.abs() * 2.0**-15 + (e0.abs() + update) * 2.0**-21)
    worst["master"] = (err / bound).max().item()
    return worst


@pytest.mark.parametrize("fmt", ["int8-moments", "bf16-master"])
def test_gpu_tail_step_matches_the_float64_reference(fmt):
    """The GPU tail (torch ops in fp32 on the GPU) and the native CPU kernel, each against the float64
    reference of the same math, with the unit tests' bounds (tests/unit/test_int8_moments.py,
    test_bf16_master.py); both are printed, so a failure says which side moved."""
    from heavylift.optim import native
    from heavylift.optim.adamw import AdamWHyper
    from heavylift.optim.compact import STEPS
    from heavylift.optim.formats import FORMATS, native_step

    kernel = native.load()
    rows, row_len = 300, 600
    src = _int8_state(rows, row_len) if fmt == "int8-moments" else _bf16_master_state(rows * row_len)
    grad = torch.randn(rows * row_len, generator=torch.Generator().manual_seed(1)) * 1e-3
    hp = AdamWHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    ref = {k: torch.empty_like(t) for k, t in src.items()}
    STEPS[fmt](src, ref, grad, hp, 3, 0.5, row_len, dtype=torch.float64)
    results = {}
    if kernel is not None:
        cpu = {k: torch.empty_like(t) for k, t in src.items()}
        native_step(kernel, FORMATS[fmt], src, cpu, grad, hp, 3, 0.5, row_len)
        results["cpu kernel"] = _errors(fmt, src, cpu, ref, hp, row_len)
    gpu = {k: t.cuda() for k, t in src.items()}
    STEPS[fmt](gpu, gpu, grad.cuda(), hp, 3, 0.5, row_len)
    results["gpu tail"] = _errors(fmt, src, {k: t.cpu() for k, t in gpu.items()}, ref, hp, row_len)
    print(f"{fmt}: worst error / bound: {results}")
    for side, worst in results.items():
        assert all(w <= 1 for w in worst.values()), (side, worst)


@pytest.mark.parametrize("fmt", ["bf16-moments", "int8-moments", "bf16-master", "bf16-master-int8"])
def test_compact_formats_train_close_to_the_reference(fmt):
    """bf16 compute, clip on, 60% of the buckets on the host (pinned, native kernel, speculation) and the
    rest a GPU tail in the tail format; against fp32 master weights and torch's AdamW on the GPU."""
    from test_gpu_engine import _engine, _model, _Reference, _run

    from heavylift.optim.formats import FORMATS

    engine = _engine(_model(), 0.6, state_format=fmt)
    host = [b for b in engine.buckets if b.on_host]
    tail = [b for b in engine.buckets if not b.on_host]
    assert host and tail
    fmt_obj, tail_fmt = FORMATS[fmt], FORMATS[FORMATS[fmt].tail]
    for b in host:
        assert b.flats["master"].is_pinned() and b.flats["master"].dtype == fmt_obj.master_dtype
    for b in tail:
        assert b.flats["exp_avg"].is_cuda and b.flats["exp_avg"].dtype == tail_fmt.buffers[1].dtype
    diff, gaps = _run(engine, _Reference(_model()))
    stats = dict(engine.pipeline.stats)
    engine.close()
    print(f"{fmt}: relative update error {diff:.3e}, max loss gap {max(gaps):.3e}, {stats}")
    assert diff <= (0.15 if fmt == "bf16-master-int8" else 0.1) and max(gaps) < 5e-2  # SR noise: CPU tests
