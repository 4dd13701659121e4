"""GPU checks (run on a GPU box; CI skips them): bf16 equivalence, a deliberate race, pinned buffers."""

from __future__ import annotations

import gc
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS, LR, CLIP = 16, 2e-3, 1.0


def _model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def _engine(model, ratio, speculate=True, state_format="fp32"):
    import heavylift
    from heavylift.config import EngineConfig

    ec = EngineConfig()
    ec.precision.dtype = "bf16"
    ec.optim.lr, ec.optim.max_grad_norm, ec.optim.weight_decay = LR, CLIP, 0.1
    ec.offload.ratio, ec.offload.speculate = ratio, speculate
    ec.offload.state_format = state_format
    ec.activation_checkpointing = True
    ec.compile = "off"  # the reference is the stock model: compiled bf16 rounds differently (docs/log.md)
    return heavylift.initialize(model=model, config=ec)[0]


class _Reference:
    """bf16 model on the GPU with fp32 master weights and torch's fused AdamW on the GPU."""

    def __init__(self, model):
        self.model = model.to("cuda", torch.bfloat16)
        self.master = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        self.initial = {n: t.cpu().clone() for n, t in self.master.items()}
        decay = [n for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n and "bias" not in n]
        rest = [n for n in self.master if n not in decay]
        for t in self.master.values():
            t.requires_grad_(True)
        self.opt = torch.optim.AdamW([{"params": [self.master[n] for n in decay], "weight_decay": 0.1},
                                      {"params": [self.master[n] for n in rest], "weight_decay": 0.0}],
                                     lr=LR, fused=True)

    def step(self, ids):
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        params = dict(self.model.named_parameters())
        for n, m in self.master.items():
            m.grad = params[n].grad.float()
            params[n].grad = None
        torch.nn.utils.clip_grad_norm_(list(self.master.values()), CLIP)
        self.opt.step()
        with torch.no_grad():
            for n, m in self.master.items():
                params[n].copy_(m)
        return loss.item()


def _run(engine, ref, steps=STEPS):
    gaps = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 1024, (2, 128), generator=g).cuda()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        gaps.append(abs(loss.item() - ref.step(ids)))
    torch.cuda.synchronize()
    master = engine.master_weights()
    # relative error of the total update: |(w - w0) - (w_ref - w0)| / |w_ref - w0| over all weights
    num = sum((master[n] - ref.master[n].detach().cpu()).double().square().sum().item() for n in master)
    den = sum((ref.master[n].detach().cpu() - ref.initial[n]).double().square().sum().item() for n in master)
    return (num / den) ** 0.5, gaps


@pytest.mark.parametrize("ratio,speculate", [(1.0, True), (0.6, True), (0.6, False)])
def test_bf16_matches_fp32_master_reference(ratio, speculate):
    model = _model()
    ref = _Reference(_model())
    engine = _engine(model, ratio, speculate)
    diff, gaps = _run(engine, ref)
    engine.close()
    print(f"ratio={ratio} speculate={speculate}: relative update error {diff:.3e}, max loss gap {max(gaps):.3e}")
    # CPU and CUDA fused AdamW round differently (~1 ulp per step); a bf16 weight can then round to its
    # neighbour and the bf16 forward feeds that back, so single elements may drift by a few lr. The
    # total update must still agree to a few percent; a stale weight or a lost step is ~100% off.
    assert diff <= 0.05
    assert max(gaps) < 2e-2


def test_race_slow_cpu_short_compute(monkeypatch):
    """The CPU optimizer is made 30 ms slower per bucket while compute is tiny: every forward must wait
    for its layer's weights; a missing wait trains on stale weights and drifts from the reference."""
    from heavylift.offload.bucket_step import BucketStepper

    def slowed(real):
        def slow(*a, **k):
            time.sleep(0.03)
            return real(*a, **k)
        return slow

    # both roads of a host bucket's step: the torch/widened one and the native kernel (speculation's)
    for name in ("step_slots", "native_step"):
        monkeypatch.setattr(BucketStepper, name, slowed(getattr(BucketStepper, name)))
    engine = _engine(_model(), 1.0)
    ref = _Reference(_model())
    diff, gaps = _run(engine, ref, steps=10)
    waited = engine.pipeline.wait_seconds
    engine.close()
    print(f"race: relative update error {diff:.3e}, forward waited {waited:.3f} s")
    assert waited > 0.05, "the forward should have had to wait for the slowed optimizer"
    assert diff <= 0.05


def test_transfer_buffers_are_pinned():
    engine = _engine(_model(), 0.6)
    ref = _Reference(_model())
    _run(engine, ref, steps=3)
    host = [b for b in engine.buckets if b.on_host]
    assert host, "expected host buckets"
    for b in host:
        assert b.flats["grad"].is_pinned() and b.flats["master"].is_pinned()
    engine.close()


@pytest.mark.parametrize("ratio", [0.6, None])
def test_fp32_compute_is_tight(ratio):
    """fp32 weights on the GPU: the only difference left is CPU vs CUDA AdamW rounding (and the compiled
    blocks' fused kernels), so the total update must agree to ~1e-5, where bf16's feedback allows a few
    percent. ``ratio=None``: the automatic placement moves buckets to the GPU tail and stops blocks
    from recomputing while the steps run."""
    import heavylift
    from heavylift.config import EngineConfig

    ec = EngineConfig()
    ec.precision.dtype = "fp32"
    ec.optim.lr, ec.optim.max_grad_norm, ec.optim.weight_decay = LR, CLIP, 0.1
    ec.offload.ratio = ratio
    engine = heavylift.initialize(model=_model(), config=ec)[0]
    ref_model = _model().cuda()
    initial = {n: p.detach().cpu().clone() for n, p in ref_model.named_parameters()}
    decay = [p for n, p in ref_model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    rest = [p for n, p in ref_model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, fused=True)
    for step in range(STEPS):
        ids = torch.randint(0, 1024, (2, 128), generator=torch.Generator().manual_seed(step)).cuda()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        ref_model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    master = engine.master_weights()
    ref = {n: p.detach().cpu() for n, p in ref_model.named_parameters()}
    num = sum((master[n] - ref[n]).double().square().sum().item() for n in master)
    den = sum((ref[n] - initial[n]).double().square().sum().item() for n in master)
    placement = engine.placement
    engine.close()
    err = (num / den) ** 0.5
    print(f"fp32 on GPU, ratio {ratio}: relative update error {err:.3e}; placement: {placement.log}")
    assert err < 1e-3
    if ratio is None:
        assert placement.stage > 4 and any("keep their activations" in m for m in placement.log)
        assert any("tail" in m for m in placement.log)


@pytest.fixture(scope="module")
def accumulated():
    """offload.accumulate device and host on the GPU (streams, pinned slots, the additions on the d2h stream),
    three clipped windows of 4 micro-batches each. Small buckets (100 K params, ~24 on the host), so that
    host accumulation's bucket in flight is small next to the host buckets' gradients (4.9 MiB). Per path: the
    masters, the highest allocation over each window's earlier micro-batches and what stays allocated after
    them (windows 2 and 3), and the host buckets' gradient bytes."""
    import heavylift
    from heavylift.config import EngineConfig

    def train(where):
        gc.collect()  # the other path's closed engine is garbage (it held 15.6 MiB while the hooks leaked it)
        ec = EngineConfig()
        ec.precision.dtype = "bf16"
        ec.optim.lr, ec.optim.max_grad_norm = LR, 0.05  # every step clips: the redo reads the summed slots
        ec.offload.ratio, ec.offload.accumulate, ec.offload.bucket_params = 0.75, where, 100_000
        # a fixed share: auto measures one per run, and the assist's buckets take torch's AdamW in a redo, so
        # two runs that split the redo differently differ in bits (session 10: auto made this test fail)
        ec.offload.gpu_assist = 0.5
        ec.batch.grad_accum = 4
        ec.compile = "off"
        engine = heavylift.initialize(model=_model(), config=ec)[0]
        # FSDP2 hands each unit's gradients over as views of one flat reduce-scatter output, so a unit that
        # also has GPU-tail parameters keeps that whole buffer alive on either path: what host accumulation
        # can give back is the gradients of the units whose buckets are all on the host (bf16)
        tail_units = {b.spec.unit for b in engine.buckets if not b.on_host}
        host_grad_bytes = sum(b.spec.numel for b in engine.buckets if b.on_host and b.spec.unit not in tail_units) * 2
        g = torch.Generator().manual_seed(1)
        peaks, between = [], []
        for _ in range(3):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for micro in range(4):
                ids = torch.randint(0, 1024, (2, 256), generator=g).cuda()
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()
                if micro == 2:
                    torch.cuda.synchronize()
                    peaks.append(torch.cuda.max_memory_allocated())
                    between.append(torch.cuda.memory_allocated())
        masters = engine.master_weights()
        engine.close()
        return {"masters": masters, "peak": max(peaks[1:]), "between": max(between[1:]), "grad_bytes": host_grad_bytes}

    return train("device"), train("host")


def test_host_accumulation_is_bitwise_device_accumulation(accumulated):
    dev, host = accumulated
    assert all(torch.equal(dev["masters"][n], host["masters"][n]) for n in dev["masters"])


def test_host_accumulation_holds_less_gpu_memory(accumulated):
    """What host accumulation is for: between micro-batches the card no longer holds the accumulated
    gradients of the units that are all on the host. (Session 9 measured host 11.4 MiB *above* device here:
    the device run's closed engine was still alive, leaked through its hooks, since fixed.) The peak over a
    backward is printed, not asserted: on this small model it is set by activations and buckets in flight."""
    dev, host = accumulated
    mib = 2**20
    print(f"host-only units' gradients {dev['grad_bytes'] / mib:.2f} MiB; between micro-batches: device "
          f"{dev['between'] / mib:.2f} MiB, host {host['between'] / mib:.2f}; peak: device {dev['peak'] / mib:.2f}, "
          f"host {host['peak'] / mib:.2f}")
    assert dev["between"] - host["between"] >= 0.9 * dev["grad_bytes"] > 0
