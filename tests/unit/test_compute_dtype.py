"""precision.dtype auto: bf16 on a GPU and on a CPU with native bf16 matmuls, fp32 on other CPUs, alike on
every rank; heavylift train's default, so its embedded run is not 20x slower on an AVX2-only CPU."""

from __future__ import annotations

import pytest
import torch

import heavylift
from heavylift.config import EngineConfig
from heavylift.config.schema import validate
from heavylift.config.train import TrainConfig
from heavylift.models import compute_dtype
from heavylift.models.compute_dtype import cpu_bf16_slowdown, resolve_dtype
from support.equivalence import tiny_model


def test_explicit_dtypes_pass_and_auto_follows_the_device(monkeypatch):
    for dt in ("bf16", "fp16", "fp32"):
        assert resolve_dtype(dt, cuda=False) == resolve_dtype(dt, cuda=True) == dt
    assert resolve_dtype("auto", cuda=True) == "bf16"
    monkeypatch.setattr(compute_dtype, "cpu_bf16_slowdown", lambda: 40.0)  # AVX2 only: emulated bf16
    assert resolve_dtype("auto", cuda=False) == "fp32"
    monkeypatch.setattr(compute_dtype, "cpu_bf16_slowdown", lambda: 0.8)  # AMX / AVX512-BF16
    assert resolve_dtype("auto", cuda=False) == "bf16"


def test_the_probe_measures_this_cpu_once():
    slowdown = cpu_bf16_slowdown()
    assert 0 < slowdown < 1e4 and cpu_bf16_slowdown() == slowdown  # a ratio of two timings, cached


def test_train_defaults_to_auto_and_the_library_to_bf16():
    assert TrainConfig().engine.precision.dtype == "auto"
    assert EngineConfig().precision.dtype == "bf16"
    ec = EngineConfig()
    ec.precision.dtype = "auto"
    validate(ec)


@pytest.mark.parametrize("slowdown, dtype, torch_dtype", [(40.0, "fp32", torch.float32), (0.8, "bf16", torch.bfloat16)])
def test_engine_resolves_auto_and_leaves_the_callers_config(monkeypatch, slowdown, dtype, torch_dtype):
    monkeypatch.setattr(compute_dtype, "cpu_bf16_slowdown", lambda: slowdown)
    ec = EngineConfig()
    ec.precision.dtype = "auto"
    engine = heavylift.initialize(model=tiny_model(), config=ec)[0]
    try:
        assert engine.config.precision.dtype == dtype and ec.precision.dtype == "auto"
        assert engine.dtype == torch_dtype
        assert {p.dtype for p in engine.module.parameters()} == {torch_dtype}
    finally:
        engine.close()


def test_the_measurement_runs_on_one_thread_and_gives_the_threads_back(monkeypatch):
    """The comparison times the kernels on one thread (a multi-threaded small matmul can wait on a thread for
    longer than it computes) and leaves the process's thread count as it was."""
    seen = []
    monkeypatch.setattr(compute_dtype, "_matmul_seconds", lambda dtype: seen.append(torch.get_num_threads()) or 1e-3)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert compute_dtype.cpu_bf16_slowdown.__wrapped__() == 1.0
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
