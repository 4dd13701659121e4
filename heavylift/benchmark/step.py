"""heavylift's training step on one GPU or, under torchrun, on several (a fixed number of tokens per GPU), on
the peers' reference work (Llama architecture, random init,
bf16, activation checkpointing, AdamW), and the three parts of its floor, each measured alone:

- forward+backward: the same engine with the optimizer switched off (every micro-step accumulates);
- CPU optimizer: one AdamW pass over every host bucket, with the worker's kernel and thread count;
- link: every host bucket's gradient down and master up, both at once, through the same pinned buffers.

    python -m heavylift.benchmark.step --model qwen3-4b --seq 4096 --mbs 4 --clip 1.0,0
    torchrun --standalone --nproc-per-node 4 -m heavylift.benchmark.step --model llama-70b ...

Prints one JSON line per clip setting (the same engine measures each in turn); with several ranks rank 0
prints their combination (``table.combine_ranks``: tokens/s summed, the floor parts measured on all ranks at
once and the slowest rank's kept).
"""

from __future__ import annotations

if __name__ == "__main__":  # run as a program: heavylift's allocator setting goes in before torch is imported
    from heavylift.cuda_allocator import prefer_expandable_segments
    prefer_expandable_segments()

import argparse
import json
import resource
import sys
import statistics
import time

import torch

from heavylift.cuda_allocator import given_setting
from heavylift.metrics import host_rss_bytes
from heavylift.shard.recompute import checkpointed

SHAPES = {
    # name: hidden, layers, ffn, heads, kv heads, vocab, tied (the anchor harness's shapes)
    "tiny": (256, 4, 704, 8, 4, 1024, True),
    "llama-1b": (2048, 16, 8192, 32, 8, 128256, True),
    "qwen3-4b": (2560, 36, 9728, 32, 8, 151936, True),
    "llama-8b": (4096, 32, 14336, 32, 8, 128256, False),
    "qwen3-14b": (5120, 40, 17408, 40, 8, 151936, False),  # issue 6's 1-GPU target (not a harness shape)
    "llama-70b": (8192, 80, 28672, 64, 8, 128256, False),  # Llama-3.3-70B (the 4-GPU target; not a harness shape)
}


def shape_config(name: str, layers: int = 0):
    """The shape's ``LlamaConfig``; ``layers`` > 0 replaces its layer count (the largest-model search)."""
    from transformers import LlamaConfig

    h, l, i, nh, kv, v, tie = SHAPES[name]
    return LlamaConfig(hidden_size=h, num_hidden_layers=layers or l, intermediate_size=i, num_attention_heads=nh,
                       num_key_value_heads=kv, vocab_size=v, tie_word_embeddings=tie, max_position_embeddings=8192,
                       attn_implementation="sdpa")


def build(name: str, layers: int = 0):
    """The shape on the meta device: the engine draws its values unit by unit."""
    from transformers import LlamaForCausalLM

    cfg = shape_config(name, layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return model, cfg


def model_flops_per_token(cfg, nparams: int, seq: int) -> int:
    """6N + 12·L·h·s (causal attention counted as the peers' harness does; recompute not counted)."""
    return 6 * nparams + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


def _batch(cfg, a) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (a.mbs, a.seq), device="cuda")


def measure_steps(engine, cfg, a, clip: float, assist: float | str = 0.0) -> dict:
    engine.config.optim.max_grad_norm = clip
    if assist != "auto":  # auto: the placement sets it after the first steps, then follows the CPU's rate
        engine.pipeline.gpu_assist = assist  # read at each step's norm (its thread exists if any phase uses it)
        if engine.placement is not None:
            engine.placement.tracking = False  # a phase with a share set by hand keeps it
    spec0 = dict(engine.pipeline.stats)
    times, waits, norms, retries, spans, bounds = [], [], [], 0, [], []
    cpu0 = (0, 0.0)
    for step in range(a.warmup + a.steps):
        if step == a.warmup:  # the CPU kernel's rate over the timed steps (a bucket in flight now counts in them)
            cpu0 = (engine.pipeline.cpu_params, engine.pipeline.cpu_seconds)
        r0 = torch.cuda.memory_stats().get("num_alloc_retries", 0)  # outside the timed window
        torch.cuda.synchronize()
        w0, t = engine.pipeline.wait_seconds, time.perf_counter()
        events = []
        for _ in range(a.accum):
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
            loss = engine(input_ids=(ids := _batch(cfg, a)), labels=ids).loss
            engine.backward(loss)
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
            if len(events) == 2 * a.accum:
                events[-1].synchronize()  # the backward's GPU work ends here, not inside the boundary's step
            t_step = time.perf_counter()
            engine.step()
        boundary = time.perf_counter() - t_step  # the last micro-step's: the window's norm, clip and dispatch
        torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - t)
            waits.append(engine.pipeline.wait_seconds - w0)
            norms.append(engine.last_step.grad_norm)
            retries += torch.cuda.memory_stats().get("num_alloc_retries", 0) - r0
            spans.append(sum(s.elapsed_time(e) for s, e in zip(events[::2], events[1::2])) / 1e3)
            bounds.append(boundary)
    engine.pipeline.wait_all()
    assisting = engine.pipeline.assisting  # auto turns the assist off where ulimit -l cannot pin its state
    cpu_params, cpu_s = engine.pipeline.cpu_params - cpu0[0], engine.pipeline.cpu_seconds - cpu0[1]
    return {"clip": clip, "gpu_assist": assist, "assist_share": engine.pipeline.gpu_assist if assisting else 0.0,
            "assisting": assisting,
            "step_s": statistics.median(times),
            "step_times": [round(x, 3) for x in times],
            "forward_wait_s": statistics.median(waits), "grad_norms": norms, "alloc_retries": retries,
            # where a step's time goes, beside the floor's parts: the compute stream's span from each forward's
            # start to its backward's end, summed over the micro-batches (the forward's waits included), and
            # the host's time in the window's last engine.step()
            "fwd_bwd_in_step_s": statistics.median(spans), "boundary_step_s": statistics.median(bounds),
            # the CPU kernel as the worker ran it in the timed steps (beside the backward and the next forward),
            # to hold against the floor's cpu_optimizer_s, which runs it alone
            "cpu_params_per_s_in_steps": cpu_params / cpu_s if cpu_s > 0 else None,
            "speculation": {k: engine.pipeline.stats[k] - spec0[k] for k in spec0}}


def fwd_bwd_alone(engine, cfg, a, reps: int = 3) -> float:
    """Forward+backward with no optimizer step, in the placement the steps settled on: micro-steps that
    never reach an accumulation boundary, each gradient dropped as it lands (as a real step streams it
    out), so the GPU holds no more than in a real step."""
    engine.pipeline.wait_all()
    saved = engine.config.batch.grad_accum
    engine.config.batch.grad_accum = 1 << 30
    drop = [p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
            for p in engine.module.parameters() if p.requires_grad]
    times = []
    try:
        with engine.pipeline.without_host_sums():  # offload.accumulate host: nothing goes to the slots here
            for _ in range(reps):
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(a.accum):
                    loss = engine(input_ids=(ids := _batch(cfg, a)), labels=ids).loss
                    engine.backward(loss)
                    engine.micro_step += 1
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
    finally:
        for h in drop:
            h.remove()
        engine.config.batch.grad_accum, engine.micro_step = saved, 0
    return statistics.median(times[1:])


@torch.no_grad()
def link_alone(engine, accum: int = 1) -> float:
    """Every host bucket's gradient down (its slot's dtype) and master up (fp32, cast to the shard),
    concurrently; an NVMe bucket's master goes up from a pinned stand-in (its ring set in a real step). With
    offload.accumulate host, each of the window's ``accum`` micro-batches sends the gradient down and all but
    the first send the partial sum up first, on the same stream (offload/accumulate.py)."""
    host = [b for b in engine.buckets if b.on_host]
    if not host:
        return 0.0
    sums = accum if engine.config.offload.accumulate == "host" else 1
    n = max(b.spec.numel for b in host)
    dev = {d: torch.empty(n, dtype=d, device="cuda") for d in {b.flats["grad"].dtype for b in host}}
    stand_in = torch.empty(n, dtype=torch.float32, pin_memory=True) if any(b.nvme for b in host) else None
    down, up = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for b in host:
        slot, on_card = b.flats["grad"], dev[b.flats["grad"].dtype][: b.spec.numel]
        with torch.cuda.stream(down):
            for k in range(sums):
                if k:  # the partial sum up, for the GPU's addition
                    on_card.copy_(slot, non_blocking=True)
                slot.copy_(on_card, non_blocking=True)
        with torch.cuda.stream(up):
            for s in b.slots:
                local = s.device_param.to_local()
                src = stand_in[: local.numel()].view_as(local) if b.nvme else s.master
                local.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def _together() -> None:
    """All ranks start the next measured part at once: concurrent, as in a training step."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _gather(record: dict) -> list[dict]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [record]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, record)
    return out


def measure_floor(engine, cfg, a) -> dict:
    """The floor's three parts, each measured alone (all ranks at once), and their maximum."""
    _together()
    fwd_bwd_s = fwd_bwd_alone(engine, cfg, a)
    _together()
    cpu_s = engine.pipeline.time_host_pass()
    _together()
    floor = {"fwd_bwd_s": fwd_bwd_s, "cpu_optimizer_s": cpu_s, "link_s": link_alone(engine, a.accum)}
    if engine.first_ram:  # NVMe buckets: their state's read + write, alone
        _together()
        floor["disk_s"] = engine.pipeline.time_disk_pass()
    floor["floor_s"] = max(floor.values())
    return floor


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen3-4b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=0, help="> 0: the shape with this many layers")
    ap.add_argument("--floor", type=int, default=1, help="0: skip measuring the floor's parts (fits only)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=6, help="steps before timing (the automatic placement "
                    "settles after step 4; an auto assist share's first check against the CPU's rate is at step 6)")
    ap.add_argument("--clip", default="1.0", help="comma-separated clip values, one measured phase each (0: off)")
    ap.add_argument("--speculate", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=-1.0, help="offload.ratio; < 0: automatic")
    ap.add_argument("--state-format", default="fp32")
    ap.add_argument("--nvme-path", default="", help="offload.device nvme with its state file here")
    ap.add_argument("--nvme-ratio", type=float, default=-1.0, help="offload.nvme_ratio; < 0: automatic")
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--gpu-assist", default="auto",
                    help="comma-separated offload.gpu_assist values (default auto, as heavylift train), one measured "
                    "phase each (after each clip value); auto only first (the placement chooses in the first steps)")
    ap.add_argument("--gpu-memory-gib", type=float, default=None,
                    help="engine.gpu_memory_gib: the most GPU memory heavylift may use (a smaller card's plan)")
    ap.add_argument("--accumulate", default="device", choices=["device", "host"],
                    help="offload.accumulate: where grad_accum sums the host buckets' gradients")
    ap.add_argument("--loss-chunk-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--recompute", default="auto", choices=["auto", "all"])
    ap.add_argument("--save-attention", action="store_true",
                    help="engine.save_attention: recomputing blocks keep their attention output")
    a = ap.parse_args(argv)

    import heavylift
    from heavylift.config import EngineConfig
    from heavylift.config.schema import share_or_auto

    clips = [float(c) for c in a.clip.split(",")]  # the flags first: a bad value fails before the model is built
    assists = [share_or_auto(f) for f in a.gpu_assist.split(",")]
    if "auto" in assists[1:]:
        raise SystemExit("--gpu-assist: auto may only come first (the placement chooses its share in the first steps)")
    from heavylift.optim.formats import SELF_TAILED
    if assists[0] == "auto" and any(assists[1:]) and a.state_format not in SELF_TAILED:
        raise SystemExit(f"--gpu-assist: the GPU does not step {a.state_format} (auto is off for it): give only "
                         f"shares, or a format of {', '.join(SELF_TAILED)}")
    t0 = time.perf_counter()
    model, cfg = build(a.model, a.layers)
    nparams = sum(p.numel() for p in model.parameters())
    ec = EngineConfig()
    ec.precision.dtype = "bf16"
    ec.optim.lr, ec.optim.max_grad_norm, ec.optim.weight_decay = 1e-5, clips[0], 0.0
    ec.batch.micro_batch_size, ec.batch.grad_accum = a.mbs, a.accum
    ec.offload.speculate, ec.offload.cpu_threads = bool(a.speculate), a.threads
    ec.offload.ratio = None if a.ratio < 0 else a.ratio
    ec.offload.state_format, ec.offload.kernel = a.state_format, a.kernel
    if a.nvme_path:
        ec.offload.device, ec.offload.nvme_path = "nvme", a.nvme_path
        ec.offload.nvme_ratio = None if a.nvme_ratio < 0 else a.nvme_ratio
    ec.offload.gpu_assist = "auto" if assists[0] == "auto" else max(assists)
    ec.loss_chunk_tokens = a.loss_chunk_tokens
    ec.offload.accumulate = a.accumulate
    ec.gpu_memory_gib = a.gpu_memory_gib
    ec.compile, ec.recompute, ec.save_attention = a.compile, a.recompute, a.save_attention
    engine = heavylift.initialize(model=model, config=ec, seq_len=a.seq)[0]  # seq: the tail at init, as train
    init_s = time.perf_counter() - t0
    tokens = a.mbs * a.seq * a.accum
    flops = model_flops_per_token(cfg, nparams, a.seq) * tokens
    phases = []
    auto_share = None  # what the placement chose in the first auto phase, for the later ones
    for clip, assist in [(c, f) for c in clips for f in assists]:
        if assist == "auto" and auto_share is not None:
            engine.pipeline.gpu_assist = auto_share
        phases.append(measure_steps(engine, cfg, a, clip, assist))
        if assist == "auto":
            auto_share = engine.pipeline.gpu_assist
        print("phase", json.dumps(phases[-1]), file=sys.stderr, flush=True)
    from heavylift.benchmark.table import combine_ranks

    def emit(floor: dict, stage: str) -> None:
        """One JSON line per phase on rank 0. ``stage`` "steps": the timed steps, before the floor is
        measured (what is left if the floor's own parts kill the process); "final": with the floor."""
        common = {
            "system": "heavylift", "model": a.model, "layers": cfg.num_hidden_layers, "params": nparams, "seq": a.seq, "mbs": a.mbs, "accum": a.accum,
            "state_format": a.state_format, "gpu_memory_gib": a.gpu_memory_gib, "kernel": engine.pipeline.kernel, "nvme_buckets": engine.first_ram,
            "speculate": bool(a.speculate), "loss_chunk_tokens": a.loss_chunk_tokens, "accumulate": a.accumulate,
            "tail_buckets": len(engine.buckets) - engine.first_tail, "buckets": len(engine.buckets),
            "host_params": sum(b.spec.numel for b in engine.buckets if b.on_host),
            "cpu_threads": engine.pipeline.cpu_threads, "init_s": round(init_s, 1),
            "compile": ec.compile, "recompute": ec.recompute, "save_attention": ec.save_attention,
            "blocks_recomputing": sum(checkpointed(b) for b in (engine.placement.blocks if engine.placement else [])),
            "placement": engine.placement.log if engine.placement else [],
            "host_rss_now_gib": round(host_rss_bytes() / 2**30, 2),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "floor": {k: None if v is None else round(v, 4) for k, v in floor.items()},
            "card": torch.cuda.get_device_name(), "torch": torch.__version__, "stage": stage,
            "cuda_alloc_conf": given_setting(),
        }
        for ph in phases:
            out = {**common, **ph, "tokens_per_s": round(tokens / ph["step_s"], 1),
                   "tflops": round(flops / ph["step_s"] / 1e12, 1),
                   "step_over_floor": round(ph["step_s"] / floor["floor_s"], 3) if floor["floor_s"] else None}
            lines = _gather(out)
            if engine.env.rank == 0:
                print(json.dumps(combine_ranks(lines)), flush=True)

    if a.floor:
        emit({"floor_s": None}, "steps")
    emit(measure_floor(engine, cfg, a) if a.floor else {"floor_s": None}, "final")
    engine.close()
    if engine.env.world_size > 1:
        from heavylift.dist.env import shutdown

        shutdown()


if __name__ == "__main__":
    main()
