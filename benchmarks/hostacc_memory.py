"""What each accumulation path leaves allocated on the GPU between micro-batches (a diagnostic, GPU only).

tests/gpu/test_gpu_engine.py found host accumulation holding more between micro-batches than device
accumulation (session 9: 97.2 against 85.8 MiB), where it should hold about the host buckets' gradients
less. A code review found the cause (the device run's closed engine leaked through its hooks, since
fixed); this shows what each path holds now. This runs the test's setup for each path with the allocator's history on, takes a snapshot after the
third micro-batch of the second window, and prints the live bytes grouped by the stream and the innermost
frames of heavylift or torch.distributed that allocated them, with the two paths side by side.

    python benchmarks/hostacc_memory.py [--bucket-params 100000] [--frames 3]
"""

from __future__ import annotations

import argparse
import collections
import gc
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def _where(frames: list[dict], depth: int) -> str:
    """The innermost ``depth`` frames in heavylift or torch.distributed (the code that asked for the memory)."""
    ours = [f for f in frames if "heavylift" in f.get("filename", "") or "distributed" in f.get("filename", "")]
    return " < ".join(f"{pathlib.Path(f['filename']).name}:{f['line']} {f['name']}" for f in ours[:depth]) or "?"


def live_bytes(where: str, bucket_params: int, depth: int) -> collections.Counter:
    import heavylift
    from heavylift.config import EngineConfig

    ec = EngineConfig()
    ec.precision.dtype = "bf16"
    ec.optim.lr, ec.optim.max_grad_norm = 2e-3, 0.05
    ec.offload.ratio, ec.offload.accumulate, ec.offload.bucket_params = 0.75, where, bucket_params
    ec.batch.grad_accum = 4
    ec.compile = "off"
    gc.collect()  # the other path's closed engine
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=200_000)
    engine = heavylift.initialize(model=_model(), config=ec)[0]
    g = torch.Generator().manual_seed(1)
    snap = None
    for window in range(2):
        for micro in range(4):
            ids = torch.randint(0, 1024, (2, 256), generator=g).cuda()
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            if window == 1 and micro == 2:
                torch.cuda.synchronize()
                snap = torch.cuda.memory._snapshot()
                print(f"{where}: allocated {torch.cuda.memory_allocated() / 2**20:.2f} MiB", flush=True)
    torch.cuda.memory._record_memory_history(enabled=None)
    engine.close()
    out = collections.Counter()
    for seg in snap["segments"]:
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                out[f"stream {seg.get('stream', '?')}: {_where(block.get('frames', []), depth)}"] += block["size"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bucket-params", type=int, default=100_000)
    p.add_argument("--frames", type=int, default=3)
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("hostacc_memory.py needs a CUDA GPU (it reads the CUDA allocator's snapshot)")
    dev = live_bytes("device", a.bucket_params, a.frames)
    host = live_bytes("host", a.bucket_params, a.frames)
    rows = sorted(set(dev) | set(host), key=lambda k: -abs(host[k] - dev[k]))
    print(f"{'device MiB':>10} {'host MiB':>10} {'host-dev':>9}  allocated by")
    for k in rows:
        print(f"{dev[k] / 2**20:10.2f} {host[k] / 2**20:10.2f} {(host[k] - dev[k]) / 2**20:+9.2f}  {k}")


if __name__ == "__main__":
    main()
