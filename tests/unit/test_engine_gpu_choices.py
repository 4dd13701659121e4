"""The engine's GPU-only init choices, run on CPU against a stand-in card: gpu_assist auto turned off where
`ulimit -l` cannot pin every host state buffer (engine_placement.InitPlacement._preflight), and
engine.gpu_memory_gib (card_bytes, _cap_gpu_memory)."""

from __future__ import annotations

import types

import pytest
import torch

from heavylift.config.errors import HeavyliftError
from heavylift.config.schema import EngineConfig
from heavylift.engine_placement import InitPlacement
from heavylift.memory.constants import CUDA_CONTEXT_BYTES
from heavylift.optim.formats import FORMATS

GIB = 2**30


def _stand_in(**offload) -> types.SimpleNamespace:
    cfg = EngineConfig()
    for k, v in offload.items():
        setattr(cfg.offload, k, v)
    e = types.SimpleNamespace(config=cfg, state_format=FORMATS[cfg.offload.state_format], grad_slot="fp32",
                              device=torch.device("cuda", 0), env=types.SimpleNamespace(is_main=True, world_size=1))
    e._min_over_ranks = types.MethodType(InitPlacement._min_over_ranks, e)
    e.card_bytes = types.MethodType(InitPlacement.card_bytes, e)
    return e


@pytest.fixture
def on_a_gpu(monkeypatch):
    """torch.cuda.is_available() says yes; the pinned checks read the stand-in limit, not this machine's."""
    import heavylift.engine_placement as ep
    import heavylift.offload.preflight as pf

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    limits = {"memlock": None}
    monkeypatch.setattr(ep, "memlock_limit", lambda: limits["memlock"])
    inf = pf.resource.RLIM_INFINITY
    monkeypatch.setattr(pf.resource, "getrlimit", lambda _: (limits["memlock"] or inf, inf))
    return limits


def test_auto_assist_is_turned_off_where_ulimit_cannot_pin_it(on_a_gpu, caplog):
    specs = [types.SimpleNamespace(numel=100_000)]  # pinned: 2.8 MB with the assist (both sets), 1.2 MB without
    e = _stand_in(gpu_assist="auto")
    assert InitPlacement._preflight(e, specs, double_buffer=True) == (True, True)  # unlimited: on
    on_a_gpu["memlock"] = 2 * 2**20  # holds the masters + gradient slot, not the whole state
    with caplog.at_level("WARNING", logger="heavylift"):
        assert InitPlacement._preflight(e, specs, double_buffer=True) == (True, False)
    assert "gpu_assist auto turned off" in caplog.text and "ulimit -l" in caplog.text
    e = _stand_in(gpu_assist=0.5)  # a share the user set is not dropped: refused, saying what to change
    with pytest.raises(HeavyliftError, match="ulimit -l"):
        InitPlacement._preflight(e, specs, double_buffer=True)
    e = _stand_in(gpu_assist="auto", state_format="bf16-master-int8")  # the GPU does not step it: never on
    assert InitPlacement._preflight(e, specs, double_buffer=True)[1] is False


def test_gpu_memory_cap_sets_the_allocator_fraction_and_the_card_size(monkeypatch):
    total = 140 * GIB
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: types.SimpleNamespace(total_memory=total))
    fractions = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, _: fractions.append(f))
    e = _stand_in()
    assert e.card_bytes() == total
    InitPlacement._cap_gpu_memory(e)
    assert fractions == []  # no cap: the allocator is left alone
    e.config.gpu_memory_gib = 70.0
    assert e.card_bytes() == 70 * GIB + CUDA_CONTEXT_BYTES  # counted as a card's total is: its context included
    InitPlacement._cap_gpu_memory(e)
    assert fractions == [pytest.approx(0.5)]
    e.config.gpu_memory_gib = 500.0  # above the card: the card
    assert e.card_bytes() == total
    InitPlacement._cap_gpu_memory(e)
    assert fractions[-1] == 1.0


def test_a_buffer_pinned_for_the_assist_alone_stays_pageable_where_the_driver_refuses(monkeypatch):
    """Where cudaHostRegister is refused, the link buffers (master, gradient slot) fall back to torch's pinned
    allocator as before, but the moments, pinned only for the assist, stay pageable rather than take its
    power-of-two rounding of host RAM."""
    import heavylift.offload.pinned as pinned
    from heavylift.offload.buckets import BucketSpec, ParamSpec
    from heavylift.offload.store import allocate_bucket

    asked = []
    monkeypatch.setattr(pinned, "register", lambda t: False)  # the driver refuses
    real_zeros = torch.zeros

    def zeros(*a, pin_memory=False, **k):
        asked.append(pin_memory)
        return real_zeros(*a, **k)  # this CPU build cannot pin: record the request instead

    monkeypatch.setattr(pinned.torch, "zeros", zeros)
    spec = BucketSpec(0, 0, (ParamSpec("w", 12, 0),))
    allocate_bucket(spec, [torch.Size([3, 4])], torch.device("cpu"), pin=True, snapshot=False, pin_all=True)
    # fp32: the master and the gradient slot (link buffers) asked torch's pinned allocator; exp_avg and
    # exp_avg_sq, refused too, did not
    assert asked.count(True) == 2
