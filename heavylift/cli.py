"""The ``heavylift`` command. User mistakes print one line (no traceback) and exit with status 2.

    heavylift train [--config run.yaml|run.toml] [--deepspeed ds.json] [--dotted.key value ...]
    heavylift report RUN_DIR     (plots RUN_DIR/metrics.jsonl into loss.png and throughput.png there)
    heavylift export CKPT OUT_DIR [--dtype bf16]   (a checkpoint as a HF safetensors model directory)
    heavylift bench --peers-dir DIR [--model qwen3-4b]   (on a GPU box: ceilings, heavylift, peers; one table)
    heavylift estimate --model PRESET|DIR [--gpus N] ...   (memory per tier, fits or not, step-time floor)

Precedence, lowest first: built-in defaults (the embedded default run), the DeepSpeed JSON (replaces the
engine section), the config file, the command-line overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from heavylift.config.errors import ConfigError, HeavyliftError
from heavylift.cuda_allocator import prefer_expandable_segments


def main(argv: list[str] | None = None) -> int:
    prefer_expandable_segments()  # before anything imports torch; the bench's processes inherit it
    parser = argparse.ArgumentParser(prog="heavylift", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune a model (no arguments: the embedded default run)",
                                epilog="any other --dotted.key value sets that config key, e.g. --engine.optim.lr 3e-5")
    train.add_argument("--config", help="YAML or TOML file with TrainConfig keys")
    train.add_argument("--deepspeed", help="DeepSpeed JSON config to import as the engine section")
    report = commands.add_parser("report", help="plot a run's metrics.jsonl into PNGs in its directory")
    report.add_argument("run_dir", help="the out_dir of a `heavylift train` run")
    commands.add_parser("estimate", add_help=False, help="bytes per tier per rank, whether it fits, the step-time "
                        "floor (heavylift estimate --help)")
    bench = commands.add_parser("bench", help="heavylift against the peers on this GPU box, one table")
    from heavylift.benchmark.run import add_arguments as add_bench_arguments
    add_bench_arguments(bench)
    export = commands.add_parser("export", help="write a checkpoint as a HF model directory (safetensors)")
    from heavylift.checkpoint.export_cli import add_arguments as add_export_arguments
    add_export_arguments(export)
    args, overrides = parser.parse_known_args(argv)
    if args.command in ("report", "export", "bench") and overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        if args.command == "estimate":
            from heavylift.estimate_cli import run as run_estimate
            return run_estimate(overrides)
        if args.command == "bench":
            from heavylift.benchmark.run import run as run_bench
            return run_bench(args)
        if args.command == "export":
            from heavylift.checkpoint.export_cli import run as run_export
            return run_export(args)
        if args.command == "report":
            from heavylift.report import report as write_report
            for path in write_report(args.run_dir):
                print(f"heavylift: wrote {path}")
        elif args.command == "train":
            _quiet_transformers()
            from heavylift.train import run
            run(train_config(args.config, args.deepspeed, overrides))
    except (HeavyliftError, ConfigError) as e:
        print(f"heavylift: error: {e}", file=sys.stderr)
        return 2
    return 0


def train_config(path: str | None, deepspeed: str | None, overrides: list[str]):
    from heavylift.config.load import apply_overrides, build, load_file
    from heavylift.config.train import TrainConfig

    tree = dataclasses.asdict(TrainConfig())
    if deepspeed:
        from heavylift.config.deepspeed import from_deepspeed
        engine, _notes = from_deepspeed(deepspeed, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        tree["engine"] = dataclasses.asdict(engine)
    if path:
        tree = _merge(tree, load_file(path))
    return build(TrainConfig, apply_overrides(tree, overrides))


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
