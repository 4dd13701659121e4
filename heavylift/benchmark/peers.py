"""Run a peer system (DeepSpeed ZeRO-3 + CPU offload, DeepSpeed SuperOffload, FSDP2 + CPUOffloadPolicy)
through the peers' reference harness (``anchor_bench.py`` and its wheels, a folder the user points to;
heavylift does not ship them) on the same model, tokens and settings."""

from __future__ import annotations

import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

MODES = {"deepspeed-zero3-offload": "ds-offload", "deepspeed-superoffload": "ds-super", "fsdp2-offload": "fsdp2-offload"}


def install_wheels(peers_dir: str) -> str:
    """Install the harness's wheels (no network) into a private folder; return it for PYTHONPATH."""
    site = os.path.join(tempfile.gettempdir(), "heavylift-peers-site")
    wheels = glob.glob(os.path.join(peers_dir, "wheels", "*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", site, *wheels], check=True, capture_output=True)
    return site


def run_peer(system: str, peers_dir: str, site: str, model: str, seq: int, mbs: int, steps: int, clip: float,
             timeout_s: int) -> tuple[dict | None, str, str]:
    """(result or None, note, raw output) for one peer system."""
    env = {**os.environ, "PYTHONPATH": site, "PYTHONUNBUFFERED": "1", "DS_SKIP_CUDA_CHECK": "1",
           "TORCH_EXTENSIONS_DIR": os.path.join(tempfile.gettempdir(), "ds_ext")}
    cmd = [sys.executable, os.path.join(peers_dir, "anchor_bench.py"), "--mode", MODES[system], "--model", model,
           "--seq", str(seq), "--mbs", str(mbs), "--steps", str(steps), "--warmup", "2", "--clip", str(clip)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return partial_result(out, warmup=2, seq=seq, mbs=mbs, timeout_s=timeout_s)
    out = proc.stdout + proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = out.strip().splitlines()[-1:] or ["no output"]
        return None, f"exit {proc.returncode}: {tail[0][:200]}", out
    r = json.loads(lines[-1])
    return {"step_s": r["step_s"], "tokens_per_s": r["tokens_per_s"], "tflops": r["model_TFLOPS"],
            "peak_gpu_gib": r["peak_gpu_GiB"], "host_gib": r["host_maxrss_GiB"]}, "", out


def partial_result(out: str, warmup: int, seq: int, mbs: int, timeout_s: int) -> tuple[dict | None, str, str]:
    """A peer stopped at its time limit: its per-step lines (``# <mode> step <i> <t>s ...``) after the
    warm-up still time it, marked partial; no step past the warm-up means no figure."""
    times = [float(m.group(2)) for m in re.finditer(r"^# \S+ step (\d+) ([0-9.]+)s", out, re.M)
             if int(m.group(1)) >= warmup]
    if not times:
        return None, f"timed out after {timeout_s} s", out
    step_s = statistics.median(times)
    return ({"step_s": step_s, "tokens_per_s": seq * mbs / step_s, "tflops": None, "peak_gpu_gib": None,
             "host_gib": None},
            f"partial: timed out after {timeout_s} s; {len(times)} timed step(s) {times} s", out)
