"""heavylift's training step on one GPU box, on the same model, tokens and settings as the peers'
reference harness (Llama architecture, random init, bf16, activation checkpointing, AdamW, clip 1.0).

Prints one JSON line: step time (median after warm-up), tokens/s, model TFLOPS, peak GPU GiB, host
RSS GiB, and where the time went (forward pre-hook waits = exposed optimizer, finish_step).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

SHAPES = {
    # name: hidden, layers, ffn, heads, kv heads, vocab, tied
    "tiny": (256, 4, 704, 8, 4, 1024, True),
    "llama-1b": (2048, 16, 8192, 32, 8, 128256, True),
    "qwen3-4b": (2560, 36, 9728, 32, 8, 151936, True),
    "llama-8b": (4096, 32, 14336, 32, 8, 128256, False),
}


def build(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, l, i, nh, kv, v, tie = SHAPES[name]
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=l, intermediate_size=i, num_attention_heads=nh,
                      num_key_value_heads=kv, vocab_size=v, tie_word_embeddings=tie, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model, cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-4b")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--clip", type=str, default="1.0",
                    help="comma-separated clip values: one measured phase each on the same engine (0 disables)")
    ap.add_argument("--speculate", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=-1.0, help="<0: automatic")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()

    import heavylift
    from heavylift.config import EngineConfig

    t0 = time.perf_counter()
    model, cfg = build(a.model)
    nparams = sum(p.numel() for p in model.parameters())
    ec = EngineConfig()
    ec.precision.dtype = "bf16"
    clips = [float(c) for c in a.clip.split(",")]
    ec.optim.lr, ec.optim.max_grad_norm, ec.optim.weight_decay = 1e-5, clips[0], 0.0
    ec.batch.micro_batch_size, ec.batch.grad_accum = a.mbs, a.accum
    ec.offload.speculate = bool(a.speculate)
    ec.offload.ratio = None if a.ratio < 0 else a.ratio
    ec.offload.cpu_threads = a.threads
    engine = heavylift.initialize(model=model, config=ec)[0]
    init_s = time.perf_counter() - t0
    tokens = a.mbs * a.seq * a.accum
    for clip in clips:
        engine.config.optim.max_grad_norm = clip
        spec0 = dict(engine.pipeline.stats)
        times, waits, finishes, norms = [], [], [], []
        for step in range(a.warmup + a.steps):
            torch.cuda.synchronize()
            w0 = engine.pipeline.wait_seconds
            t = time.perf_counter()
            for _ in range(a.accum):
                ids = torch.randint(0, cfg.vocab_size, (a.mbs, a.seq), device="cuda")
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                f = time.perf_counter()
                engine.step()
            finish = time.perf_counter() - f
            torch.cuda.synchronize()
            if step >= a.warmup:
                times.append(time.perf_counter() - t)
                waits.append(engine.pipeline.wait_seconds - w0)
                finishes.append(finish)
                norms.append(engine.last_step.grad_norm)
        engine.pipeline.wait_all()
        step_s = statistics.median(times)
        flops = (6 * nparams + 12 * cfg.num_hidden_layers * cfg.hidden_size * a.seq) * tokens
        out = {
            "system": "heavylift", "model": a.model, "params": nparams, "seq": a.seq, "mbs": a.mbs,
            "accum": a.accum, "clip": clip, "speculate": a.speculate, "kernel": "native" if engine.pipeline._native else "torch",
            "first_tail_bucket": engine.first_tail, "buckets": len(engine.buckets),
            "cpu_threads": engine.pipeline._cpu_threads,
            "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
            "tflops": round(flops / step_s / 1e12, 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "forward_wait_s": round(statistics.median(waits), 4), "finish_step_s": round(statistics.median(finishes), 4),
            "speculation": {k: engine.pipeline.stats[k] - spec0[k] for k in spec0},
            "init_s": round(init_s, 1), "step_times": [round(x, 3) for x in times], "grad_norms": norms,
            "card": torch.cuda.get_device_name(), "torch": torch.__version__,
        }
        print(json.dumps(out), flush=True)
    engine.close()


if __name__ == "__main__":
    main()
