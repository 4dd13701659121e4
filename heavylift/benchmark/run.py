"""``heavylift bench``: on the GPU box it runs on, in one run: the ceilings, heavylift, and the peers on
the same model, tokens and settings; one table; JSON + markdown written under ``--out``.

Each part runs in its own process (they must not share GPU or host memory), one after another. With
``--gpus N`` heavylift's step and the peers run under torchrun with N ranks, the same tokens per GPU
(weak scaling: ``--seq``/``--mbs``/``--accum`` are per GPU), tokens/s summed over the ranks; ``--gpus 1,4``
runs heavylift at each count and reports its scaling efficiency (the peers and the table: the largest).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from heavylift.benchmark.peers import MODES, install_wheels, json_records, launcher, run_peer
from heavylift.benchmark.table import assemble, markdown
from heavylift.config.errors import HeavyliftError
from heavylift.cuda_allocator import given_setting


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen3-4b",
                   help="tiny, llama-1b, qwen3-4b, llama-8b (the harness's shapes), qwen3-14b, llama-70b (heavylift only)")
    p.add_argument("--gpus", default="1", help="GPUs, one rank each (torchrun); a comma list (1,4) also reports "
                   "heavylift's weak scaling; tokens per GPU stay fixed")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--state-format", default="fp32")
    p.add_argument("--gpu-assist", default="auto",
                   help="offload.gpu_assist for heavylift's run: auto (as heavylift train), or a share (0: off)")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="engine.gpu_memory_gib for heavylift's run: plan and allocate as on a card this size "
                   "(78.5 for an 80 GB card: the ~79.1 GiB torch reports, less the CUDA context); "
                   "the peers are not capped")
    p.add_argument("--save-attention", action="store_true",
                   help="engine.save_attention for heavylift's run: recomputing blocks keep their attention output")
    p.add_argument("--peers-dir", default="", help="folder with anchor_bench.py and wheels/ (the peers' harness)")
    p.add_argument("--peers", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    p.add_argument("--peer-timeout", type=int, default=420)
    p.add_argument("--budget-s", type=int, default=0,
                   help="wall seconds for the whole bench (0: none): the last peers get what is left, so a "
                   "peer stopped early still reports its timed steps; results are written after each part")
    p.add_argument("--out", default="benchmarks/results")


def gpu_counts(text: str, available: int) -> list[int]:
    """``--gpus``: "4" or "1,4" -> sorted counts, each between 1 and the GPUs this machine has."""
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise HeavyliftError(f"bench: --gpus {text!r}: give a GPU count or a comma list of counts (e.g. 4 or 1,4)")
    if counts[-1] > available:
        raise HeavyliftError(f"bench: --gpus {counts[-1]} but this machine has {available} GPU(s)")
    return counts


def step_command(a: argparse.Namespace, gpus: int) -> list[str]:
    """heavylift's step benchmark, under torchrun with ``gpus`` ranks when more than one."""
    return [*launcher(gpus), "-m", "heavylift.benchmark.step", "--model", a.model, "--seq", str(a.seq),
            "--mbs", str(a.mbs), "--accum", str(a.accum), "--clip", str(a.clip), "--steps", str(a.steps),
            "--state-format", a.state_format, "--gpu-assist", str(a.gpu_assist),
            *(["--gpu-memory-gib", str(a.gpu_memory_gib)] if a.gpu_memory_gib else []),
            *(["--save-attention"] if a.save_attention else [])]


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _failed(cmd: list[str], proc: subprocess.CompletedProcess) -> HeavyliftError:
    out = proc.stdout + proc.stderr
    what = " ".join(cmd[cmd.index("-m") + 1:][:1]) if "-m" in cmd else cmd[-1]
    log = pathlib.Path(tempfile.mkstemp(prefix="heavylift-bench-", suffix=".log")[1])
    log.write_text(out)
    return HeavyliftError(f"{what} failed (exit {proc.returncode}): {failure_line(out)[:400]} (its output: {log})")


def _json_lines(cmd: list[str], timeout: int) -> tuple[list[dict], str]:
    proc = _run(cmd, timeout)
    if proc.returncode != 0:
        raise _failed(cmd, proc)
    return json_records(proc.stdout), proc.stdout + proc.stderr


def step_record(proc: subprocess.CompletedProcess, cmd: list[str]) -> tuple[dict, str]:
    """heavylift's record from its step benchmark: the first phase with its floor measured (stage "final").
    Where the process died after its timed steps, while measuring the floor's parts (say the host ran out
    of RAM), the steps' own record (stage "steps") and a note that says so; no record at all is an error."""
    records = json_records(proc.stdout)
    final = [r for r in records if r.get("stage", "final") == "final"]
    why = failure_line(proc.stdout + proc.stderr)[:300]
    if final:  # measured in full; a failure after it (closing, shutting down) is only noted
        return final[0], "" if proc.returncode == 0 else f"the step benchmark exited {proc.returncode} after its record: {why}"
    steps = [r for r in records if r.get("stage") == "steps"]
    if not steps:
        raise _failed(cmd, proc)
    return steps[0], f"floor not measured: the step benchmark died after its timed steps (exit {proc.returncode}: {why})"


def run_step(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    """The step benchmark; one that runs past ``timeout`` comes back as exit 124 with what it printed."""
    try:
        return _run(cmd, timeout)
    except subprocess.TimeoutExpired as e:
        text = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        return subprocess.CompletedProcess(cmd, 124, text[0], text[1] + f"\nTimeoutExpired: after {timeout} s")


def failure_line(out: str) -> str:
    """The line that says why a (torchrun) child failed: the last exception line a rank printed, else the
    last line of the output (torchrun's own summary names no cause)."""
    lines = out.strip().splitlines() or ["no output"]
    causes = [l for l in lines if re.match(r"^(\[rank\d+\]:\s*)?[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:", l)
              and "ChildFailedError" not in l]
    return (causes or lines)[-1].strip()


def _commit() -> str:
    """The checkout's commit; HEAVYLIFT_COMMIT names it where the tree travels without its .git (GPU boxes)."""
    if os.environ.get("HEAVYLIFT_COMMIT"):
        return os.environ["HEAVYLIFT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=pathlib.Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def peer_timeout(a: argparse.Namespace, started: float, now: float) -> int:
    """One peer's time limit: ``--peer-timeout``, cut to what is left of ``--budget-s`` (less 15 s to write
    the results); 0 when too little is left to start one."""
    if not a.budget_s:
        return a.peer_timeout
    left = int(a.budget_s - (now - started)) - 15
    return min(a.peer_timeout, left) if left >= 30 else 0


def run(a: argparse.Namespace) -> int:
    import torch

    started = time.monotonic()
    if not torch.cuda.is_available():
        raise HeavyliftError("heavylift bench measures GPU training: run it on a machine with a CUDA GPU")
    counts = gpu_counts(a.gpus, torch.cuda.device_count())
    gpus = counts[-1]
    out_dir = pathlib.Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    (ceilings,), _ = _json_lines([py, "-m", "heavylift.benchmark.ceilings"], 600)
    by_gpus, raw = {}, {}
    step_notes = {}
    for n in counts:
        proc = run_step(cmd := step_command(a, n), 1200)
        raw[f"heavylift-{n}gpu"] = proc.stdout + proc.stderr
        by_gpus[n], step_notes[n] = step_record(proc, cmd)
    step = by_gpus[gpus]
    case = {"shape": a.model, "seq": a.seq, "micro_batch": a.mbs, "accumulation": a.accum, "clip": a.clip,
            "state_format": a.state_format, "gpus": gpus, "cuda_alloc_conf": given_setting(),
            **({"gpu_memory_gib": a.gpu_memory_gib} if a.gpu_memory_gib else {})}
    date = datetime.date.today().isoformat()
    card = ceilings["card"]
    stem = f"{date}-{a.model}-s{a.seq}x{a.mbs}-{gpus}x{card.replace(' ', '_')}"
    peers, notes = {}, {"heavylift": step_notes[gpus]}

    def write() -> dict:
        # after every part, so that a bench stopped from outside keeps what it measured
        result = assemble(case, card, _commit(), date, ceilings, step, peers,
                          {k: v for k, v in notes.items() if v}, scaling=by_gpus)
        (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / f"{stem}.md").write_text(markdown(result))
        (out_dir / f"{stem}.log").write_text("\n".join(f"=== {k}\n{v}" for k, v in raw.items()))
        return result

    wanted = [p for p in a.peers.split(",") if p]
    unknown = [p for p in wanted if p not in MODES]
    if unknown:
        raise HeavyliftError(f"unknown peer {unknown[0]!r}: use {', '.join(MODES)}")
    if wanted and not a.peers_dir:
        notes.update({p: "not run: no --peers-dir" for p in wanted})
    write()
    if wanted and a.peers_dir:
        site = install_wheels(a.peers_dir)
        for name in wanted:
            limit = peer_timeout(a, started, time.monotonic())
            if not limit:
                peers[name], notes[name] = None, f"not run: the bench's --budget-s {a.budget_s} was spent"
                continue
            notes[name] = "not finished: the bench was stopped from outside while this peer ran"
            write()  # so that a bench killed while this peer runs says so
            peers[name], notes[name], raw[name] = run_peer(name, a.peers_dir, site, a.model, a.seq, a.mbs,
                                                           a.steps, a.clip, limit, gpus)
            write()
    print(markdown(write()))
    return 0
