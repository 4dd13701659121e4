"""Helpers of the checkpoint tests: one training recipe, run on 1 or 2 ranks, and full-state snapshots.

The data is always that of two ranks: on 2 ranks rank r trains on batch r of each micro-step, on one
rank the engine trains on both batches concatenated. Every row has the same number of tokens, all
scored, so the mean loss over the concatenation is the mean of the two ranks' losses, the gradient
FSDP's averaging reduce-scatter computes: the same math, up to fp32 summation order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import heavylift
from support.equivalence import Case, batches, engine_config, gather_moments, snapshot_state, tiny_model

DATA_RANKS = 2
CASE = Case("checkpoint", max_norm=1.0, weight_decay=0.1, schedule="warmup_cosine", steps=8, grad_accum=2,
            lr=3e-3)


def new_engine(seed: int = 0, case: Case = CASE, engine_seed: int = 0):
    """``seed``: the model's initial weights; ``engine_seed``: engine.seed (a stochastically rounded master's bits)."""
    config = engine_config(case)
    config.seed = engine_seed
    engine, _, _, _ = heavylift.initialize(model=tiny_model(seed=seed, unused=case.unused_param), config=config)
    return engine


def train(engine, steps: range, case: Case = CASE) -> None:
    world, rank = engine.env.world_size, engine.env.rank
    for step in steps:
        for micro in range(case.grad_accum):
            bs = batches(step, micro, DATA_RANKS)
            x = torch.cat(bs) if world == 1 else bs[rank]
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()


def full_state(engine) -> dict:
    """Every parameter's full master, moments and step count, and the step counters (all ranks)."""
    master = engine.master_weights()
    moments = gather_moments(engine)
    return {"params": {n: (master[n], *moments[n][:2], moments[n][2]) for n in master},
            "global_step": engine.global_step, "micro_step": engine.micro_step,
            "lr": [g["lr"] for g in engine.optimizer.param_groups]}


def local_state(engine) -> list[torch.Tensor]:
    """This rank's state tensors and device shards, copied (for bitwise comparisons)."""
    return snapshot_state(engine)


def max_differences(a: dict, b: dict) -> dict:
    """Largest |weight| difference, largest moment differences relative to their magnitude, steps equal."""
    out = {"param": 0.0, "exp_avg_rel": 0.0, "exp_avg_sq_rel": 0.0, "steps_equal": True}
    for n, (m1, a1, v1, s1) in a["params"].items():
        m2, a2, v2, s2 = b["params"][n]
        out["param"] = max(out["param"], (m1 - m2).abs().max().item())
        out["exp_avg_rel"] = max(out["exp_avg_rel"], (a1 - a2).abs().max().item() / (a2.abs().max().item() or 1))
        out["exp_avg_sq_rel"] = max(out["exp_avg_sq_rel"], (v1 - v2).abs().max().item() / (v2.abs().max().item() or 1))
        out["steps_equal"] &= s1 == s2
    out["counters_equal"] = (a["global_step"], a["micro_step"]) == (b["global_step"], b["micro_step"])
    out["lr_equal"] = a["lr"] == b["lr"]
    return out


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
