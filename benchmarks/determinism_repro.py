"""Run the same 2-rank gloo case several times in the same processes and report where the runs differ
(state tensors, per-step norms, the pipeline's speculated/redone/undone counts); --save / --compare
compare across processes, --reference runs torch.optim.AdamW beside it and prints both norms.

    PYTHONPATH=. python benchmarks/determinism_repro.py --runs 6 --steps 12 --clip 1.5 --bucket-params 3000 \
        --threads 2 --nan-step 7

Found with it (session 3): the "nondeterminism" was the harness's first run in each process training
both ranks on batch 0 (docs/log.md, 2-rank determinism).
"""
import argparse
import os
import sys

import torch
import torch.multiprocessing as mp

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def _worker(rank, world, port, args):
    from support.spawn import rank_env
    rank_env(rank, world, port, TESTS)
    torch.set_num_threads(args.threads)
    from support.equivalence import Case, run_case, train_state

    case = Case("repro", steps=args.steps, max_norm=args.clip, grad_accum=args.accum, lr=args.lr,
                speculate=args.speculate, kernel=args.kernel, bucket_params=args.bucket_params,
                nan_step=args.nan_step)
    runs = []
    for r in range(args.runs):
        if args.reference:
            res = run_case(case, keep_state=True)
            print(f"rank {rank} run {r} norms (mine, ref):", res["norms"], flush=True)
            out = {"state": res["final_state"], "norms": [n for n, _ in res["norms"]], "stats": res["stats"]}
        else:
            out = train_state(case)
        runs.append(out)
    if args.save:
        torch.save([r["state"] for r in runs], f"{args.save}.rank{rank}.pt")
    if args.compare:
        other = torch.load(f"{args.compare}.rank{rank}.pt")
        for r, st in enumerate(other):
            diff = [i for i, (a, b) in enumerate(zip(runs[0]["state"], st)) if not torch.equal(a, b)]
            print(f"rank {rank}: saved run {r} vs this run 0: {len(diff)} tensors differ", flush=True)
    first = runs[0]
    for r, out in enumerate(runs[1:], 1):
        diff = [i for i, (a, b) in enumerate(zip(first["state"], out["state"])) if not torch.equal(a, b)]
        nd = [i for i, (a, b) in enumerate(zip(first["norms"], out["norms"])) if a != b]
        print(f"rank {rank} run {r}: {len(diff)}/{len(first['state'])} tensors differ; norms differ at steps {nd}; "
              f"stats {first['stats']} vs {out['stats']}", flush=True)
        if rank == 0 and nd:
            print("  norms", first["norms"], out["norms"], flush=True)
    from heavylift.dist.env import shutdown
    shutdown()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--clip", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kernel", default="auto")
    p.add_argument("--bucket-params", type=int, default=200_000_000)
    p.add_argument("--save", default="")
    p.add_argument("--compare", default="")
    p.add_argument("--nan-step", type=int, default=-1)
    p.add_argument("--reference", action="store_true")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--no-speculate", dest="speculate", action="store_false")
    args = p.parse_args()
    from heavylift.optim import native
    native.load()
    sys.path.insert(0, TESTS)
    from support.spawn import free_port
    mp.spawn(_worker, args=(args.world, free_port(), args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
