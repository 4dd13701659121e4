"""What ``heavylift train`` runs: the model, the data, how long, where the logs go, and the engine.

Every default is the embedded default run (SmolLM2-135M-Instruct on the bundled data, a few minutes on
two CPU cores): ``heavylift train`` with no arguments trains exactly this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from heavylift.config.errors import ConfigError
from heavylift.config.schema import EngineConfig, OptimConfig, PrecisionConfig, ScheduleConfig, validate


def _default_engine() -> EngineConfig:
    # precision auto: bf16, except fp32 on a CPU without native bf16 matmuls (20x faster there)
    return EngineConfig(optim=OptimConfig(lr=1e-4), schedule=ScheduleConfig(kind="warmup_cosine", warmup_steps=2,
                                                                   warmup_start_ratio=0.1),
                        precision=PrecisionConfig(dtype="auto"))



@dataclass
class TrainConfig:
    # "default" (the embedded SmolLM2-135M-Instruct), a preset (tiny, llama-3-8b, ...) or a local HF directory.
    model: str = "default"
    # A tokenizer directory to use instead of the model's; presets use a byte-level tokenizer otherwise.
    tokenizer: str = ""
    # JSONL files; an empty train_data means the bundled dataset (and its held-out split).
    train_data: str = ""
    eval_data: str = ""
    data_format: Literal["auto", "alpaca", "chat", "text"] = "auto"
    # Held out of train_data when eval_data is empty and the data is not the bundled set.
    eval_fraction: float = 0.1
    seq_len: int = 512
    overlong: Literal["truncate", "drop"] = "truncate"
    # Optimizer steps; 0 means as many as `epochs` passes over the data take.
    max_steps: int = 20
    epochs: int = 1
    # Evaluate every this many steps (0: only before and after training).
    eval_every: int = 0
    log_every: int = 1
    # Per-GPU peak TFLOP/s for the logged MFU; null: the built-in table (H100/H200 bf16 dense), none on CPU.
    peak_tflops: float | None = None
    out_dir: str = "runs/default"
    # Data order. (A preset's random initial weights are drawn by the engine with engine.seed.)
    seed: int = 0
    # Checkpoints into checkpoint_dir ("" = <out_dir>/checkpoints): every save_every steps (0: only at the
    # end and on SIGTERM/SIGINT), keeping the newest keep_checkpoints (0: all).
    checkpoint_dir: str = ""
    save_every: int = 0
    keep_checkpoints: int = 2
    # "auto": the newest checkpoint in checkpoint_dir that verifies (a fresh start if none); a tag in
    # checkpoint_dir; a path to a checkpoint directory (anything with a '/'); "": never resume.
    resume: str = ""
    engine: EngineConfig = field(default_factory=_default_engine)


def validate_train(cfg: TrainConfig) -> TrainConfig:
    """Range checks, naming the dotted key; the engine section is checked by ``schema.validate``."""
    _check(bool(cfg.model), "model", cfg.model, "'default', a preset name or a model directory")
    _check(cfg.data_format in ("auto", "alpaca", "chat", "text"), "data_format", cfg.data_format,
           "auto, alpaca, chat or text")
    _check(0 <= cfg.eval_fraction < 1, "eval_fraction", cfg.eval_fraction, "a number in [0, 1)")
    _check(cfg.seq_len >= 8, "seq_len", cfg.seq_len, "an integer >= 8")
    _check(cfg.overlong in ("truncate", "drop"), "overlong", cfg.overlong, "truncate or drop")
    _check(cfg.max_steps >= 0, "max_steps", cfg.max_steps, "0 (run `epochs`) or an integer >= 1")
    _check(cfg.epochs >= 1, "epochs", cfg.epochs, "an integer >= 1")
    _check(cfg.eval_every >= 0, "eval_every", cfg.eval_every, "0 (before and after only) or an integer >= 1")
    _check(cfg.log_every >= 1, "log_every", cfg.log_every, "an integer >= 1")
    _check(cfg.peak_tflops is None or cfg.peak_tflops > 0, "peak_tflops", cfg.peak_tflops,
           "null (the built-in table) or a number > 0")
    _check(bool(cfg.out_dir), "out_dir", cfg.out_dir, "a directory path")
    _check(cfg.save_every >= 0, "save_every", cfg.save_every, "0 (at the end only) or an integer >= 1")
    _check(cfg.keep_checkpoints >= 0, "keep_checkpoints", cfg.keep_checkpoints, "0 (keep all) or an integer >= 1")
    try:
        validate(cfg.engine)
    except ConfigError as e:
        raise ConfigError(f"engine.{e.key}", e.value, e.allowed) from None
    return cfg


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)
