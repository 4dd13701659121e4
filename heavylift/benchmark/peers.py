"""Run a peer system (DeepSpeed ZeRO-3 + CPU offload, DeepSpeed SuperOffload, FSDP2 + CPUOffloadPolicy)
through the peers' reference harness (``anchor_bench.py`` and its wheels, a folder the user points to;
heavylift does not ship them) on the same model, tokens and settings.

The harness runs on several GPUs under torchrun as it is: it takes RANK/WORLD_SIZE/LOCAL_RANK from the
environment, DeepSpeed and FSDP2 shard over the whole group, and every rank prints its own JSON line
(its own tokens); those lines are combined as heavylift's are (``table.combine_peer_ranks``).
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

from heavylift.benchmark.table import combine_peer_ranks

MODES = {"deepspeed-zero3-offload": "ds-offload", "deepspeed-superoffload": "ds-super", "fsdp2-offload": "fsdp2-offload"}
HARNESS = "anchor_bench.py"


def install_wheels(peers_dir: str) -> str:
    """Install the harness's wheels (no network) into a private folder; return it for PYTHONPATH."""
    site = os.path.join(tempfile.gettempdir(), "heavylift-peers-site")
    wheels = glob.glob(os.path.join(peers_dir, "wheels", "*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", site, *wheels], check=True, capture_output=True)
    return site


def harness_shapes(peers_dir: str) -> tuple[str, ...]:
    """The model shapes the harness knows (the keys of its SHAPES table), read without running it."""
    with open(os.path.join(peers_dir, HARNESS)) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SHAPES" for t in node.targets):
            return tuple(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return ()


def launcher(gpus: int) -> list[str]:
    """How a benchmark process starts: plain on one GPU, torchrun with one rank per GPU on several."""
    if gpus == 1:
        return [sys.executable]
    # --tee 3: torchrun writes each rank's output line by line with a [defaultN]: prefix, so the ranks'
    # result lines never interleave mid-line on the shared pipe
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--tee", "3",
            "--nproc-per-node", str(gpus)]


def peer_command(system: str, peers_dir: str, model: str, seq: int, mbs: int, steps: int, clip: float,
                 gpus: int = 1) -> list[str]:
    return [*launcher(gpus), os.path.join(peers_dir, HARNESS), "--mode", MODES[system], "--model", model,
            "--seq", str(seq), "--mbs", str(mbs), "--steps", str(steps), "--warmup", "2", "--clip", str(clip)]


def json_records(stdout: str) -> list[dict]:
    """The JSON lines of a run's output; torchrun may prefix a rank's lines (``[rank0]:``)."""
    out = []
    for line in stdout.splitlines():
        start = line.find("{")
        if start >= 0 and (start == 0 or line[:start].rstrip().endswith(":")):
            try:
                out.append(json.loads(line[start:]))
            except json.JSONDecodeError:
                continue
    return out


def run_peer(system: str, peers_dir: str, site: str, model: str, seq: int, mbs: int, steps: int, clip: float,
             timeout_s: int, gpus: int = 1) -> tuple[dict | None, str, str]:
    """(result or None, note, raw output) for one peer system."""
    shapes = harness_shapes(peers_dir)
    if shapes and model not in shapes:
        return None, f"not run: the harness has no {model!r} shape ({', '.join(shapes)})", ""
    env = {**os.environ, "PYTHONPATH": site, "PYTHONUNBUFFERED": "1", "DS_SKIP_CUDA_CHECK": "1",
           "TORCH_EXTENSIONS_DIR": os.path.join(tempfile.gettempdir(), "ds_ext")}
    cmd = peer_command(system, peers_dir, model, seq, mbs, steps, clip, gpus)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return partial_result(out, warmup=2, seq=seq, mbs=mbs, timeout_s=timeout_s)
    out = proc.stdout + proc.stderr
    records = [r for r in json_records(proc.stdout) if "step_s" in r]
    if proc.returncode != 0 or len(records) != gpus:
        tail = out.strip().splitlines()[-1:] or ["no output"]
        return None, f"exit {proc.returncode}, {len(records)}/{gpus} rank result(s): {tail[0][:200]}", out
    return combine_peer_ranks(records), "", out


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
