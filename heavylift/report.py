"""``heavylift report RUN_DIR``: plot a run's ``metrics.jsonl`` into ``loss.png`` and ``throughput.png`` there."""

from __future__ import annotations

import json
import pathlib

from heavylift.config.errors import HeavyliftError


def read_log(run_dir: str | pathlib.Path) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl``; a HeavyliftError naming the problem if there are none."""
    run = pathlib.Path(run_dir)
    if not run.is_dir():
        raise HeavyliftError(f"run directory {str(run)!r} does not exist")
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise HeavyliftError(f"{path} does not exist: is {str(run)!r} the out_dir of a `heavylift train` run?")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise HeavyliftError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not any("loss" in r for r in records):
        raise HeavyliftError(f"{path} has no training steps logged")
    return records


def report(run_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Write ``loss.png`` (train and held-out loss vs step) and ``throughput.png`` (tokens/s vs step)."""
    from matplotlib.figure import Figure  # the Agg canvas, no pyplot and no display
    from matplotlib.ticker import MaxNLocator

    records = read_log(run_dir)
    run = pathlib.Path(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = sorted([(0, r["eval_loss_before"]) for r in records if "eval_loss_before" in r]
                   + [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
                   + [(r["step"], r["eval_loss_after"]) for r in records if "eval_loss_after" in r])
    speed = [(r["step"], r["tokens_per_s"]) for r in records if "tokens_per_s" in r]

    loss_png, speed_png = run / "loss.png", run / "throughput.png"
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    ax.set(xlabel="step", ylabel="loss", title=f"loss: {run.name}")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    fig.savefig(loss_png, backend="agg")

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if speed:
        ax.plot(*zip(*speed), label="tokens/s")
    ax.set(xlabel="step", ylabel="tokens/s (all ranks)", title=f"throughput: {run.name}")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(speed_png, backend="agg")
    return [loss_png, speed_png]
