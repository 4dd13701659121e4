"""GPU checks of the automatic choices (run on a GPU box; CI skips them): gpu_assist auto picks a share in
the first steps and its assisted steps stay on the reference; engine.gpu_memory_gib caps the allocator and
what the placement plans against."""

from __future__ import annotations

import pytest
import torch

from test_gpu_engine import _Reference, _engine, _model, _run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_gpu_assist_auto_picks_a_share_and_stays_on_the_reference():
    """Every bucket on the host, no speculation (so every step is one the assist may share): auto (the
    default) measures the CPU and the link after step 2 and assists from then on."""
    engine = _engine(_model(), 1.0, speculate=False)
    assert engine.config.offload.gpu_assist == "auto" and engine.pipeline.assisting
    host = [b for b in engine.buckets if b.on_host]
    assert all(t.is_pinned() for b in host for t in b.flats.values()), "auto pins every host state buffer"
    ref = _Reference(_model())
    diff, _ = _run(engine, ref, steps=8)
    share, assisted = engine.pipeline.gpu_assist, engine.pipeline.stats["assisted"]
    notes = list(engine.placement.log)
    engine.close()
    print(f"auto share {share:.3f}, {assisted} buckets assisted, relative update error {diff:.3e}; {notes}")
    assert 0.0 < share <= 0.9 and assisted > 0
    assert diff <= 0.05  # the bound of test_bf16_matches_fp32_master_reference


def test_gpu_memory_cap_holds_the_allocator_and_the_placement():
    import heavylift
    from heavylift.config import EngineConfig
    from heavylift.memory.constants import CUDA_CONTEXT_BYTES

    ec = EngineConfig()
    ec.gpu_memory_gib = 3.0
    engine = heavylift.initialize(model=_model(), config=ec)[0]
    try:
        assert engine.card_bytes() == 3 * 2**30 + CUDA_CONTEXT_BYTES
        assert engine.placement is not None and engine.placement.total == engine.card_bytes()
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(4 * 2**30, dtype=torch.uint8, device="cuda")  # beyond the cap, well within the card
    finally:
        engine.close()
        torch.cuda.set_per_process_memory_fraction(1.0)  # the cap is per process: later tests get the card
