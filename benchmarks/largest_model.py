"""The largest model that trains on this machine, per state format: the planner's answer, then a try.

For each format, the layer count of a shape family (default: the qwen3-14b width, seq 4096, micro-batch 2,
8,192 tokens per step) is raised until the planner (the same estimate the engine's preflight checks) says
it no longer fits this machine. No accumulation by default: it keeps 2 B/param of sharded gradients on
the card between micro-batches, which costs the largest model 1-5 B params. With ``--try``, the
largest that fits then runs two optimizer steps of ``heavylift.benchmark.step`` (one warm-up, one timed;
no floor), so the claim is a measured fact, with the host RSS and GPU peak it reached. One JSON line per format:

    python benchmarks/largest_model.py [--formats fp32,int8-moments] [--try] [--timeout 400] [--logs DIR]
    python benchmarks/largest_model.py --gpu-mem-gib 80 --host-mem-gib 128   # plan another machine only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

from heavylift.benchmark.peers import json_records
from heavylift.benchmark.run import failure_line
from heavylift.benchmark.step import shape_config
from heavylift.memory.constants import CUDA_CONTEXT_BYTES, STATE_FORMATS
from heavylift.memory.machine import this_machine
from heavylift.memory.model import model_shape
from heavylift.memory.plan import Setup
from heavylift.memory.preflight import estimate_assisted


def plans_fit(base: str, layers: int, setup: Setup, machine) -> tuple[bool, object]:
    p = estimate_assisted(model_shape(shape_config(base, layers)), setup, machine, auto=True)  # as the try runs
    return p.fits and "tight" not in p.verdicts.values(), p


def largest_layers(base: str, setup: Setup, machine, hi: int = 256) -> tuple[int, object]:
    """The most layers whose plan fits (0 when even one layer does not); fitting is monotone in layers."""
    lo, best = 1, (0, None)
    while lo <= hi:
        mid = (lo + hi) // 2
        ok, p = plans_fit(base, mid, setup, machine)
        if ok:
            best, lo = (mid, p), mid + 1
        else:
            hi = mid - 1
    return best


def try_run(a, fmt: str, layers: int) -> dict:
    cmd = [sys.executable, "-m", "heavylift.benchmark.step", "--model", a.base, "--layers", str(layers),
           "--seq", str(a.seq), "--mbs", str(a.mbs), "--accum", str(a.accum), "--warmup", "1", "--steps", "1",
           "--floor", "0", "--state-format", fmt]
    if a.gpu_mem_gib is not None:  # a smaller card on this one: heavylift holds what it leaves past its context
        cmd += ["--gpu-memory-gib", f"{a.gpu_mem_gib - CUDA_CONTEXT_BYTES / 2**30:.2f}"]
    t = time.perf_counter()
    log = pathlib.Path(a.logs) / f"try-{fmt}-{layers}.log" if a.logs else None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        if log is not None:  # written as it runs: a call stopped from outside still shows where the try was
            with log.open("w") as f:
                code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=a.timeout, env=env).returncode
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
            out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:  # keep what it printed: where it was when time ran out
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        code = None
    if log is not None:
        out = log.read_text(errors="replace")
    records = json_records(out)
    if code or not records:
        why = f"timed out after {a.timeout} s" if code is None else f"exit {code}"
        return {"trained": False, "why": f"{why}: {failure_line(out)[:600]}", "wall_s": round(time.perf_counter() - t, 1)}
    r = records[-1]
    return {"trained": True, "wall_s": round(time.perf_counter() - t, 1), "step_s": r["step_s"],
            "tokens_per_s": r["tokens_per_s"], "host_rss_gib": r["host_rss_gib"], "peak_gpu_gib": r["peak_gpu_gib"],
            "host_params": r["host_params"], "init_s": r["init_s"], "grad_norms": r["grad_norms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="qwen3-14b", help="a heavylift.benchmark.step shape whose layers are varied")
    ap.add_argument("--formats", default=",".join(STATE_FORMATS))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--try", dest="try_", action="store_true", help="train the largest that fits for two steps")
    ap.add_argument("--timeout", type=int, default=400, help="seconds per try")
    ap.add_argument("--logs", default="", help="a directory for each try's whole output")
    ap.add_argument("--gpu-mem-gib", type=float, default=None,
                    help="plan for a card of this many GiB; with --try, train capped at it (engine.gpu_memory_gib)")
    ap.add_argument("--host-mem-gib", type=float, default=None)
    a = ap.parse_args()
    machine = this_machine(a.gpu_mem_gib, a.host_mem_gib)
    # gpu_assist auto, the default the try runs with: on a GPU every host state buffer is pinned
    setup = Setup(seq=a.seq, mbs=a.mbs, accum=a.accum, compiled=machine.has_cuda, pin=machine.has_cuda,
                  gpu_assist=float(machine.has_cuda))
    for fmt in a.formats.split(","):
        s = dataclasses.replace(setup, state_format=fmt)
        layers, p = largest_layers(a.base, s, machine)
        rec = {"format": fmt, "base": a.base, "layers": layers, "seq": a.seq, "mbs": a.mbs, "accum": a.accum,
               "machine": {"gpu_gib": round((machine.gpu_total_bytes or 0) / 2**30, 1),
                           "host_available_gib": round((machine.host_available_bytes or 0) / 2**30, 1),
                           "gpu": machine.gpu_name, "cores": os.cpu_count()}}
        if p is not None:
            rec |= {"params_b": round(p.shape.params / 1e9, 2), "planned_host_gib": round(p.host_peak_node / 2**30, 1),
                    "planned_gpu_gib": round(p.gpu_peak / 2**30, 1)}
            nxt = plans_fit(a.base, layers + 1, s, machine)[1]
            rec["next_refused"] = {"layers": layers + 1, "params_b": round(nxt.shape.params / 1e9, 2),
                                   "reasons": nxt.reasons}
            if a.try_:  # the plan first, on stderr: a try stopped from outside leaves it behind
                print(json.dumps(rec), file=sys.stderr, flush=True)
                rec["try"] = try_run(a, fmt, layers)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
