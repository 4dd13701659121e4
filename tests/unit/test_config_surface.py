"""The user-facing config surface, frozen: adding, removing or renaming a key must update this list
(and the docs). Keys are the dotted names ``heavylift train --dotted.key value`` and config files accept."""

import dataclasses
import typing

from heavylift.cli import main
from heavylift.config.train import TrainConfig

KEYS = [
    "model", "tokenizer", "train_data", "eval_data", "data_format", "eval_fraction", "seq_len", "overlong",
    "max_steps", "epochs", "eval_every", "log_every", "peak_tflops", "out_dir", "seed",
    "checkpoint_dir", "save_every", "keep_checkpoints", "resume",
    "engine.optim.lr", "engine.optim.betas", "engine.optim.eps", "engine.optim.weight_decay",
    "engine.optim.max_grad_norm", "engine.optim.no_decay",
    "engine.schedule.kind", "engine.schedule.warmup_steps", "engine.schedule.total_steps",
    "engine.schedule.warmup_start_ratio", "engine.schedule.min_ratio",
    "engine.precision.dtype", "engine.precision.loss_scale", "engine.precision.initial_scale_power",
    "engine.precision.loss_scale_window", "engine.precision.hysteresis", "engine.precision.min_loss_scale",
    "engine.offload.device", "engine.offload.nvme_path", "engine.offload.nvme_ratio", "engine.offload.nvme_buffers",
    "engine.offload.pin_memory", "engine.offload.ratio", "engine.offload.gpu_assist", "engine.offload.cpu_threads",
    "engine.offload.speculate", "engine.offload.bucket_params", "engine.offload.kernel",
    "engine.offload.state_format", "engine.offload.grad_slot", "engine.offload.accumulate",
    "engine.batch.micro_batch_size", "engine.batch.grad_accum",
    "engine.activation_checkpointing", "engine.recompute", "engine.save_attention", "engine.compile", "engine.loss_chunk_tokens", "engine.gpu_memory_gib", "engine.seed",
]
SUBCOMMANDS = {"train", "report", "estimate", "export", "bench"}


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += dotted_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_train_config_keys_are_frozen():
    actual = dotted_keys(TrainConfig)
    added, removed = sorted(set(actual) - set(KEYS)), sorted(set(KEYS) - set(actual))
    assert not added and not removed, (f"config surface changed: added {added}, removed {removed}; update KEYS "
                                       "in tests/unit/test_config_surface.py deliberately")
    assert len(actual) == len(set(actual)) == len(KEYS)


def test_cli_subcommands_are_frozen(capsys):
    import argparse
    from unittest import mock
    seen = {}
    real = argparse._SubParsersAction.add_parser

    def spy(self, name, **kw):
        seen[name] = True
        return real(self, name, **kw)

    with mock.patch.object(argparse._SubParsersAction, "add_parser", spy):
        try:
            main(["--help"])
        except SystemExit:
            pass
    capsys.readouterr()
    assert set(seen) == SUBCOMMANDS


ESTIMATE_FLAGS = ["--model", "--gpus", "--nodes", "--seq", "--mbs", "--accum", "--tail-ratio", "--no-ac", "--save-attention", "--no-compile",
                  "--no-speculate", "--no-pin", "--state-format", "--grad-slot", "--accumulate", "--loss-chunk-tokens", "--dtype", "--gpu-mem-gib",
                  "--host-mem-gib", "--nvme", "--nvme-free-gib", "--nvme-ratio", "--nvme-buffers", "--gpu-assist",
                  "--nvme-gbs", "--gpu-tflops", "--cpu-params-per-s", "--link-gbs"]
BENCH_FLAGS = ["--model", "--gpus", "--seq", "--mbs", "--accum", "--clip", "--steps", "--state-format", "--gpu-assist", "--gpu-memory-gib", "--save-attention",
               "--peers-dir",
               "--peers", "--peer-timeout", "--budget-s", "--out"]


def _flags(parser) -> list[str]:
    return [a.option_strings[0] for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"]


def test_estimate_and_bench_flags_are_frozen():
    import argparse

    from heavylift.benchmark.run import add_arguments
    from heavylift.estimate_cli import parser

    assert _flags(parser()) == ESTIMATE_FLAGS
    bench = argparse.ArgumentParser()
    add_arguments(bench)
    assert _flags(bench) == BENCH_FLAGS
    assert parser().parse_args(["--model", "tiny"]).state_format == "auto"  # estimate picks the format
