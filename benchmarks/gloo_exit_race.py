"""Reproduce the exit abort of a gloo rank whose worker thread is late, and check heavylift's remedy.

    python benchmarks/gloo_exit_race.py --runs 20              # exit right after the last collective
    python benchmarks/gloo_exit_race.py --runs 20 --settle     # heavylift.dist.env.settle_gloo_workers() first

Two ranks, each pinned to its own core, which a busy process shares all along. After a warm-up collective
each rank puts its gloo worker threads (``pt_gloo_runloop``) at SCHED_IDLE, so they run late, as they do
behind a busy main thread on a loaded machine; then the ranks do three all_gathers of tensors they drop at
once, and exit. A worker that drops the collective's tensors after the interpreter began to
finalize aborts the rank ("terminate called without an active exception", SIGABRT). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rank_main(settle: bool) -> None:
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    cpu = sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]
    os.sched_setaffinity(0, {cpu})
    dist.init_process_group("gloo")
    dist.all_reduce(torch.ones(1))  # the workers exist and are named by now
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == "pt_gloo_runloop":
                    os.sched_setaffinity(int(tid), {cpu})
                    os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass
    for _ in range(3):
        parts = [torch.zeros(1000) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, torch.full((1000,), float(rank)))
        del parts
    if settle:
        sys.path.insert(0, ROOT)
        from heavylift.dist.env import settle_gloo_workers

        settle_gloo_workers()


def launch(settle: bool, timeout: int) -> bool:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(random.randint(20000, 40000)), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--rank-process"] + (["--settle"] if settle else [])
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0] + "\ntimeout")
    return any(p.returncode != 0 or "terminate called" in o for p, o in zip(procs, outs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--settle", action="store_true", help="settle the gloo workers before exiting")
    ap.add_argument("--timeout", type=int, default=120)
    ap.add_argument("--rank-process", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_process:
        rank_main(a.settle)
        return
    cpus = sorted(os.sched_getaffinity(0))
    busy = [subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpus[r % len(cpus)]}}})\n"
                              "while True: pass"]) for r in range(2)]
    start, aborts = time.time(), 0
    try:
        for i in range(a.runs):
            aborted = launch(a.settle, a.timeout)
            aborts += aborted
            print(f"# run {i + 1}/{a.runs}: {'ABORT' if aborted else 'ok'}", file=sys.stderr, flush=True)
    finally:
        for b in busy:
            b.kill()
    print(json.dumps({"settle": a.settle, "runs": a.runs, "aborts": aborts, "seconds": round(time.time() - start)}))


if __name__ == "__main__":
    main()
