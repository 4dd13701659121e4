"""``heavylift train``: parse, validate, init, build, train, close."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import torch
from tqdm import tqdm

import heavylift
from heavylift.checkpoint import Preemption, resume_auto
from heavylift.checkpoint import load as load_checkpoint
from heavylift.checkpoint import save as save_checkpoint
from heavylift.config.train import TrainConfig, validate_train
from heavylift.data import PackedLoader, build_datasets
from heavylift.metrics import MetricsLog, peak_tflops_for
from heavylift.models import load_model
from heavylift.trainer import EvalResult, evaluate, train


def run(cfg: TrainConfig) -> dict:
    """Fine-tune as ``cfg`` says; prints held-out loss before and after; returns (and saves) a summary."""
    validate_train(cfg)
    from heavylift.dist.env import init_dist, shutdown

    env = init_dist()  # process group and this rank's CPU cores, before any model or thread pool
    rank, world = env.rank, env.world_size
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    from heavylift.memory import check_train
    check_train(cfg, warn=say)  # before anything is loaded or allocated; refuses what cannot fit
    say(f"heavylift: loading model {cfg.model!r}")
    start = time.perf_counter()
    # On the meta device: the engine draws or streams each rank's shards; no rank holds the whole model.
    model, tokenizer, weights = load_model(cfg.model, cfg.tokenizer, device="meta")
    data = build_datasets(tokenizer, cfg.seq_len, cfg.train_data, cfg.eval_data, cfg.data_format,
                          cfg.eval_fraction, cfg.overlong, cfg.seed)
    say(f"heavylift: {_describe(model, weights)}; data {_describe_data(data)} ({time.perf_counter() - start:.0f} s)")
    batch = cfg.engine.batch
    train_loader = PackedLoader(data.train, batch.micro_batch_size, rank, world, cfg.seed)
    eval_loader = (PackedLoader(data.eval, batch.micro_batch_size, rank, world, shuffle=False)
                   if len(data.eval) else None)
    steps = cfg.max_steps or max(cfg.epochs * train_loader.batches_per_epoch // batch.grad_accum, 1)
    engine_cfg = cfg.engine
    if engine_cfg.schedule.total_steps == 0:  # the decaying schedules end with the run
        schedule = dataclasses.replace(engine_cfg.schedule, total_steps=steps)
        engine_cfg = dataclasses.replace(engine_cfg, schedule=schedule)

    engine, optimizer, _, _ = heavylift.initialize(model=model, config=engine_cfg, weights=weights,
                                                   seq_len=cfg.seq_len)
    out_dir = pathlib.Path(cfg.out_dir)
    log = MetricsLog(out_dir, enabled=rank == 0, echo=tqdm.write)
    eval_fn = (lambda: evaluate(engine, eval_loader.one_pass())) if eval_loader else None
    before = eval_fn() if eval_fn else None
    say(f"heavylift: held-out before training: {_describe_eval(before)} ({time.perf_counter() - start:.0f} s)")
    ckpt_dir = pathlib.Path(cfg.checkpoint_dir or out_dir / "checkpoints")
    start_step = _resume(cfg, engine, train_loader, ckpt_dir, say)
    saving = bool(cfg.save_every or cfg.checkpoint_dir)  # else only a preempted run saves

    def save_fn(step: int) -> None:  # at the last step only when saving; earlier: periodic or preempted
        if saving or step < steps:
            began = time.perf_counter()
            save_checkpoint(engine, ckpt_dir, f"step-{step}", extra={"loader": train_loader.state_dict()},
                            keep=cfg.keep_checkpoints, tokenizer=tokenizer)
            say(f"heavylift: saved {ckpt_dir / f'step-{step}'} in {time.perf_counter() - began:.1f} s")

    with Preemption() as preempt, tqdm(total=steps, initial=start_step, desc="train", unit="step",
                                       disable=rank != 0, dynamic_ncols=True) as progress:
        records = train(engine, optimizer, train_loader, steps, batch.grad_accum, log, cfg.log_every,
                        cfg.eval_every, eval_fn, progress, _peak_tflops(cfg, engine.device),
                        start_step=start_step, save_every=cfg.save_every, save_fn=save_fn, preempt=preempt)
    after = eval_fn() if eval_fn else None
    say(f"heavylift: held-out after {steps} steps: {_describe_eval(after)} ({time.perf_counter() - start:.0f} s)")
    summary = {"steps": steps, "final_train_loss": records[-1]["loss"] if records else None,
               "eval_before": dataclasses.asdict(before) if before else None,
               "eval_after": dataclasses.asdict(after) if after else None, "loader": train_loader.state_dict()}
    if rank == 0:
        log.log(steps, {"eval_loss_before": before.loss, "eval_loss_after": after.loss} if before else {})
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.close()
    engine.close()
    if world > 1:
        shutdown()
    return summary


def _resume(cfg: TrainConfig, engine, train_loader, ckpt_dir: pathlib.Path, say) -> int:
    """Load ``cfg.resume`` ("auto": the newest checkpoint that verifies) and return the step reached."""
    if not cfg.resume:
        return 0
    began = time.perf_counter()
    if "/" in cfg.resume:  # a checkpoint directory given by its path
        ckpt_dir, tag = pathlib.Path(cfg.resume).parent, pathlib.Path(cfg.resume).name
    else:
        tag = cfg.resume
    extra = resume_auto(engine, ckpt_dir) if tag == "auto" else load_checkpoint(engine, ckpt_dir, tag)
    if extra is None:
        say(f"heavylift: no checkpoint in {ckpt_dir}; starting fresh")
        return 0
    train_loader.load_state_dict(extra["loader"])
    say(f"heavylift: resumed {ckpt_dir / extra['tag']} at step {engine.global_step} "
        f"in {time.perf_counter() - began:.1f} s")
    return engine.global_step


def _peak_tflops(cfg: TrainConfig, device: torch.device) -> float | None:
    """The configured per-GPU peak, else the table's for this GPU, else None (no MFU; always on CPU)."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    return peak_tflops_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def _describe(model: torch.nn.Module, weights: str | None) -> str:
    how = ("streamed per rank from its safetensors" if weights else
           "drawn per rank, one unit at a time (engine.seed)" if any(p.is_meta for p in model.parameters()) else
           "loaded whole")
    return f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters {how}"


def _describe_data(data) -> str:
    t, e = data.train_stats, data.eval_stats
    extra = f", {t.truncated + e.truncated} truncated, {t.dropped + e.dropped} dropped" if t.truncated + t.dropped + \
        e.truncated + e.dropped else ""
    return f"{t.samples} train / {e.samples} held-out samples in {t.rows} / {e.rows} packed rows{extra}"


def _describe_eval(result: EvalResult | None) -> str:
    if result is None:
        return "no held-out data"
    return f"loss {result.loss:.4f}, exact match {result.accuracy:.0%} of {result.samples} samples"
