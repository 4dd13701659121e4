"""Count exit aborts of the 2-rank torchrun case (tests/dist/torchrun_step.py) with core binding on or off.

    python benchmarks/bind_abort.py --runs 12 --bind auto --load 2

Each launch is `torchrun --standalone --nproc-per-node 2` of the torchrun test's script; a launch counts
as aborted when any rank exits non-zero or prints "terminate called". ``--load N`` keeps N busy processes
running meanwhile (``--load-kind spin``: a Python loop; ``torch``: matrix products on two threads), since the
2-core development machine is shared and the abort showed under load; ``--keep-cores DIR`` keeps the core
dumps of aborted ranks for gdb.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _spin(kind: str) -> None:
    if kind == "torch":  # two threads of matrix products: memory traffic and thread switches, like a test suite
        import torch

        torch.set_num_threads(2)
        a = torch.randn(512, 512)
        while True:
            a = (a @ a).tanh()
    while True:
        pass


def _allow_core_dumps() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def launch(bind: str, timeout: int, keep: str = "") -> tuple[bool, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HEAVYLIFT_BIND_CORES=bind, HEAVYLIFT_COLLECTIVE_TIMEOUT_S="60",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with tempfile.TemporaryDirectory() as out:
        limits = _allow_core_dumps if keep else None  # core_pattern "core": written into the launch directory
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
               "2", os.path.join(TESTS, "dist", "torchrun_step.py"), TESTS, out]
        try:
            proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=timeout,
                                  preexec_fn=limits)
        except subprocess.TimeoutExpired as e:
            return True, f"timeout: {str(e.stdout)[-300:]}"
        text = proc.stdout + proc.stderr
        aborted = proc.returncode != 0 or "terminate called" in text
        if not aborted:
            return False, ""
        if keep:
            import glob
            import shutil

            for core in glob.glob(os.path.join(out, "core*")):
                shutil.move(core, os.path.join(keep, f"{os.path.basename(core)}-{time.time():.0f}"))
        lines = text.splitlines()
        first = next((i for i, l in enumerate(lines) if "terminate called" in l or "Traceback" in l), len(lines))
        return True, "\n".join(lines[max(first - 5, 0): first + 15])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--bind", default="auto", help="HEAVYLIFT_BIND_CORES for the ranks")
    ap.add_argument("--load", type=int, default=0, help="busy-looping processes alongside")
    ap.add_argument("--load-kind", default="spin", choices=["spin", "torch"])
    ap.add_argument("--keep-cores", default="", help="a directory to move aborted ranks' core dumps to")
    ap.add_argument("--timeout", type=int, default=180)
    a = ap.parse_args()
    spinners = [mp.Process(target=_spin, args=(a.load_kind,), daemon=True) for _ in range(a.load)]
    for s in spinners:
        s.start()
    aborts, tails, start = 0, [], time.time()
    try:
        for i in range(a.runs):
            aborted, tail = launch(a.bind, a.timeout, a.keep_cores)
            aborts += aborted
            if aborted:
                tails.append(tail)
            print(f"# launch {i + 1}/{a.runs}: {'ABORT' if aborted else 'ok'}", file=sys.stderr, flush=True)
    finally:
        for s in spinners:
            s.terminate()
    print(json.dumps({"bind": a.bind, "load": a.load, "load_kind": a.load_kind, "runs": a.runs, "aborts": aborts,
                      "seconds": round(time.time() - start), "abort_tails": tails}))


if __name__ == "__main__":
    main()
