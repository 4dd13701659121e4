"""What a checkpoint holds of an engine, as two pure-ish mappings (no I/O here).

``tensor_state``: the DCP state dict. Each trained parameter's master and Adam moments, in the state
format's own form (optim/formats.py: int8 codes and their per-block scales, a bf16 master and its
compensation, ...), are this rank's dim-0 shard wrapped as
``DTensor.from_local(shard, mesh, [Shard(0)], shape=full, stride=...)``,
so DCP records global offsets and a checkpoint written on W ranks loads on any other count (FSDP2 and
DTensor both shard like ``torch.chunk``: uneven and empty trailing shards included). Host-store state
gets a CPU mesh over the same ranks so that wrapping never copies it to the GPU. Step counts and
persistent buffers are replicated plain tensors (DCP writes them once); frozen parameters are saved
as the FSDP2 DTensors they are. Loading fills the very same tensors in place. Per-block scales are
``rows x blocks`` and shard along rows like their parameter (blocks never cross a row), so they reshard
too. A checkpoint loads only into an engine of the same state format (``check_compatible``).

``scalar_state``: counters, scheduler, loss scaler, hyper-parameters, speculation policy and the
parameter table (name -> full shape) as JSON.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from heavylift.config.errors import HeavyliftError

from heavylift.optim.quant import scale_shape

FORMAT = 1


def slots(engine) -> Iterator:
    for bucket in engine.buckets:
        yield from bucket.slots


def rows_shape(shape: torch.Size) -> tuple[int, ...]:
    """The shape as sharded: a 0-d parameter is stored as one row (``shard.layout`` does the same)."""
    return tuple(shape) if len(shape) else (1,)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def sharded(local: Tensor, mesh: DeviceMesh, full_shape: tuple[int, ...]) -> DTensor:
    """``local`` (this rank's torch.chunk shard along dim 0) as a DTensor of ``full_shape``; no copy."""
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(full_shape),
                              stride=_contiguous_stride(full_shape))


class Meshes:
    """The engine's mesh for device-resident state, a CPU mesh over the same ranks for host state."""

    def __init__(self, engine):
        self.device = engine.env.mesh
        if self.device.device_type == "cpu":
            self.cpu = self.device
        else:
            self.cpu = DeviceMesh("cpu", torch.arange(engine.env.world_size))

    def for_tensor(self, t: Tensor) -> DeviceMesh:
        return self.cpu if t.device.type == "cpu" else self.device


def _trained_names(engine) -> set[str]:
    return {s.spec.name for s in slots(engine)}


def persistent_buffers(module) -> dict[str, Tensor]:
    keys = set(module.state_dict().keys())
    return {n: b for n, b in module.named_buffers() if n in keys}


def tensor_state(engine) -> dict[str, Tensor]:
    """NVMe-resident state appears as stand-ins of the right shape and dtype that own no memory
    (``checkpoint/nvme_state.py`` hands DCP the real bytes, one bucket at a time)."""
    meshes = Meshes(engine)
    sd: dict[str, Tensor] = {}
    for bucket in engine.buckets:
        per_block = {b.kind: b.per_block for b in bucket.fmt.buffers}
        dtype = {b.kind: b.dtype for b in bucket.fmt.buffers}
        for s in bucket.slots:
            full = rows_shape(s.device_param.shape)
            for kind in bucket.fmt.kinds:
                local = s.state[kind] if not bucket.nvme else stand_in(
                    scale_shape(s.grad.shape) if per_block[kind] else s.grad.shape, dtype[kind])
                shape = scale_shape(full) if per_block[kind] else full
                sd[f"{kind}.{s.spec.name}"] = sharded(local, meshes.for_tensor(local), shape)
            sd[f"step.{s.spec.name}"] = s.step
    trained = _trained_names(engine)
    for n, p in engine.module.named_parameters():
        if n not in trained:
            sd[f"frozen.{n}"] = p.detach()
    for n, b in persistent_buffers(engine.module).items():
        sd[f"buffer.{n}"] = b
    return sd


def stand_in(shape, dtype: torch.dtype) -> Tensor:
    """A tensor of ``shape`` and ``dtype`` backed by one element (DCP plans with its metadata only)."""
    return torch.zeros((), dtype=dtype).expand(tuple(shape))


def nvme_keys(engine) -> dict[str, tuple[int, int, str]]:
    """DCP key -> (bucket index, slot index, state kind) of every NVMe-resident state tensor."""
    return {f"{kind}.{s.spec.name}": (bucket.spec.index, i, kind)
            for bucket in engine.buckets if bucket.nvme for i, s in enumerate(bucket.slots) for kind in bucket.fmt.kinds}


def param_table(engine) -> dict[str, dict]:
    """name -> {"key": DCP key of its weight, "shape": full shape}, in the model's order."""
    trained = _trained_names(engine)
    table = {}
    for n, p in engine.module.named_parameters():
        table[n] = {"key": f"{'master' if n in trained else 'frozen'}.{n}", "shape": list(p.shape)}
    for n, b in persistent_buffers(engine.module).items():
        table[n] = {"key": f"buffer.{n}", "shape": list(b.shape)}
    return table


def scalar_state(engine) -> dict:
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    return {
        "format": FORMAT,
        "world_size": engine.env.world_size,
        "global_step": engine.global_step,
        "micro_step": engine.micro_step,
        "skipped_steps": engine.skipped_steps,
        "last_committed": bool(engine.pipeline._last_committed),
        "scheduler": engine.lr_scheduler.state_dict(),
        "scaler": engine.scaler.state_dict(),
        "param_groups": groups,
        "engine_config": dataclasses.asdict(engine.config),
        "params": param_table(engine),
        "placement": engine.placement_state(),
        "rounding_seed": engine.rounding_seed,
    }


def check_compatible(engine, meta: dict, where: str) -> None:
    """Refuse, naming the first difference, a checkpoint of another model or another optimizer layout."""
    if meta.get("format") != FORMAT:
        raise HeavyliftError(f"{where}: checkpoint format {meta.get('format')} is not {FORMAT}, the one this "
                             "heavylift reads")
    saved = meta.get("engine_config", {}).get("offload", {}).get("state_format", "fp32")
    if saved != engine.config.offload.state_format:
        raise HeavyliftError(f"{where}: its optimizer state is in format {saved!r} but this engine's "
                             f"offload.state_format is {engine.config.offload.state_format!r}: set "
                             f"offload.state_format: {saved} (heavylift train: --engine.offload.state_format "
                             f"{saved}) to resume it; heavylift does not convert optimizer state between formats")
    mine, theirs = param_table(engine), meta["params"]
    for n in mine.keys() | theirs.keys():
        if n not in theirs or n not in mine:
            side = "checkpoint" if n not in theirs else "model"
            raise HeavyliftError(f"{where}: parameter {n!r} is missing from the {side}; is this checkpoint of "
                                 "another model (or another set of trainable parameters)?")
        if mine[n] != theirs[n]:
            raise HeavyliftError(f"{where}: parameter {n!r} is {theirs[n]} in the checkpoint but {mine[n]} "
                                 "in the model")
    if len(meta["param_groups"]) != len(engine.optimizer.param_groups):
        raise HeavyliftError(f"{where}: {len(meta['param_groups'])} optimizer param groups in the checkpoint, "
                             f"{len(engine.optimizer.param_groups)} in the engine")


@torch.no_grad()
def apply_scalar_state(engine, meta: dict) -> None:
    engine.global_step = meta["global_step"]
    engine.micro_step = meta["micro_step"]
    engine.skipped_steps = meta["skipped_steps"]
    engine.pipeline._last_committed = meta["last_committed"]
    engine.lr_scheduler.load_state_dict(meta["scheduler"])
    engine.scaler.load_state_dict(meta["scaler"])
    engine.reseed_rounding(meta.get("rounding_seed", engine.rounding_seed))
    for group, saved in zip(engine.optimizer.param_groups, meta["param_groups"], strict=True):
        for k, v in saved.items():
            group[k] = tuple(v) if isinstance(v, list) else v


@torch.no_grad()
def refresh_device_params(engine) -> None:
    """Copy the loaded masters into the (bf16) device shards the forward reads."""
    for bucket in engine.resident_buckets():
        for s in bucket.slots:
            s.device_param.to_local().copy_(s.master)
