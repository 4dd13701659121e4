"""Accuracy of each optimizer state format against exact fp32 AdamW on the embedded default fine-tune.

Runs ``heavylift train`` once per format (one after another, same seed and settings, held-out eval every
few steps), then writes one JSON with each run's curves and its gaps to the fp32 run, and one PNG of the
train-loss curves. Optional control runs give the gaps a scale: fp32 again with the same seed (the
run-to-run noise floor; 0 if training is deterministic) and fp32 with other seeds (a different data order).
A run directory that already holds a finished run (its wall_s.json) is read, not run again, so the runs
can be made over several invocations.

    python benchmarks/format_accuracy.py --out-dir runs/format-accuracy [--max-steps 40] [--eval-every 5]
        [--repeat-fp32] [--other-seeds 1] [-- any other heavylift train arguments]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

FORMATS = ("fp32", "bf16-moments", "int8-moments", "bf16-master", "bf16-master-int8")


def read_run(run_dir: pathlib.Path) -> dict:
    """Per-step train loss, held-out losses by step and the summary of one ``heavylift train`` out_dir."""
    train_loss, eval_loss = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train_loss[rec["step"]] = rec["loss"]
        if "eval_loss" in rec:
            eval_loss[rec["step"]] = rec["eval_loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    eval_loss[0] = before["loss"]
    eval_loss[summary["steps"]] = after["loss"]
    steps = sorted(train_loss)
    return {"steps": steps, "train_loss": [train_loss[s] for s in steps],
            "final_train_loss": summary["final_train_loss"],
            "eval_steps": sorted(eval_loss), "eval_loss": [eval_loss[s] for s in sorted(eval_loss)],
            "eval_loss_before": before["loss"], "eval_loss_after": after["loss"],
            "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
            "eval_samples": after["samples"]}


def gaps(run: dict, ref: dict) -> dict:
    """``run`` minus ``ref`` (the fp32 run): per-step train-loss gap (max and mean of its absolute value,
    over the steps both logged), the final train loss, held-out loss and exact-match accuracy after."""
    ref_loss = dict(zip(ref["steps"], ref["train_loss"]))
    diffs = [abs(loss - ref_loss[s]) for s, loss in zip(run["steps"], run["train_loss"]) if s in ref_loss]
    return {"train_loss_max_abs_gap": max(diffs), "train_loss_mean_abs_gap": sum(diffs) / len(diffs),
            "final_train_loss_gap": run["final_train_loss"] - ref["final_train_loss"],
            "eval_loss_after_gap": run["eval_loss_after"] - ref["eval_loss_after"],
            "accuracy_after_gap": run["accuracy_after"] - ref["accuracy_after"]}


def train(run_dir: pathlib.Path, fmt: str, seed: int, args: argparse.Namespace, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "heavylift", "train", "--out_dir", str(run_dir), "--seed", str(seed),
           "--eval_every", str(args.eval_every), "--engine.offload.state_format", fmt]
    if args.max_steps:
        cmd += ["--max_steps", str(args.max_steps)]
    cmd += extra
    wall_file = run_dir / "wall_s.json"
    if wall_file.exists():  # a finished run of an earlier invocation (the runs are slow on a shared CPU)
        print(f"format_accuracy: {fmt} seed {seed}: reusing {run_dir}", flush=True)
    else:
        print(f"format_accuracy: {fmt} seed {seed} -> {run_dir}", flush=True)
        began = time.perf_counter()
        with open(run_dir.with_suffix(".log"), "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
        wall_file.write_text(json.dumps(time.perf_counter() - began) + "\n")
    run = read_run(run_dir)
    run.update(format=fmt, seed=seed, wall_s=json.loads(wall_file.read_text()))
    return run


def plot(runs: dict[str, dict], path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, run in runs.items():
        control = name not in FORMATS
        ax.plot(run["steps"], run["train_loss"], label=name, linestyle=":" if control else "-",
                marker=None if control else ".", alpha=0.6 if control else 1.0)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=pathlib.Path, required=True, help="runs, accuracy.json, train_loss.png")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=0, help="0: heavylift train's default")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--repeat-fp32", action="store_true", help="run fp32 a second time with the same seed")
    ap.add_argument("--other-seeds", default="", help="comma-separated seeds for extra fp32 runs")
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    args.out_dir.mkdir(parents=True, exist_ok=True)

    plan = [(fmt, fmt, args.seed) for fmt in args.formats.split(",")]
    if args.repeat_fp32:
        plan.append(("fp32-repeat", "fp32", args.seed))
    plan += [(f"fp32-seed{s}", "fp32", int(s)) for s in args.other_seeds.split(",") if s]
    runs = {name: train(args.out_dir / name, fmt, seed, args, extra) for name, fmt, seed in plan}

    ref = runs["fp32"]
    result = {"settings": {"seed": args.seed, "steps": ref["steps"][-1], "eval_every": args.eval_every,
                           "extra_args": extra},
              "runs": runs, "gaps_vs_fp32": {name: gaps(run, ref) for name, run in runs.items() if name != "fp32"}}
    (args.out_dir / "accuracy.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(runs, args.out_dir / "train_loss.png",
         f"embedded default, {ref['steps'][-1]} steps, seed {args.seed}: train loss per state format")
    print(f"{'run':<16} {'final train':>11} {'held-out':>9} {'exact':>6} {'max|gap|':>9} {'mean|gap|':>9} "
          f"{'held-out gap':>12} {'wall s':>7}")
    for name, run in runs.items():
        g = result["gaps_vs_fp32"].get(name)
        print(f"{name:<16} {run['final_train_loss']:>11.4f} {run['eval_loss_after']:>9.4f} "
              f"{run['accuracy_after']:>6.0%} {g['train_loss_max_abs_gap'] if g else 0:>9.4f} "
              f"{g['train_loss_mean_abs_gap'] if g else 0:>9.4f} {g['eval_loss_after_gap'] if g else 0:>+12.4f} "
              f"{run['wall_s']:>7.0f}")


if __name__ == "__main__":
    main()
