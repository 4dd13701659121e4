"""Learning-rate schedules as pure multiplier functions, wrapped in a stock ``LambdaLR``."""

from __future__ import annotations

import math

import torch

from heavylift.config.schema import ScheduleConfig


def lr_multiplier(cfg: ScheduleConfig, step: int) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based: the first step uses step 0)."""
    w = cfg.warmup_steps
    if cfg.kind != "constant" and step < w:
        return cfg.warmup_start_ratio + (1.0 - cfg.warmup_start_ratio) * step / w
    if cfg.kind in ("constant", "warmup"):
        return 1.0
    span = max(cfg.total_steps - w, 1)
    progress = min(max(step - w, 0) / span, 1.0)
    if cfg.kind == "warmup_cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # warmup_linear
        shape = 1.0 - progress
    return cfg.min_ratio + (1.0 - cfg.min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(cfg, step))
