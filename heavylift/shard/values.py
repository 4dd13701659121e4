"""Where each rank's initial fp32 master values come from, one parameter shard at a time.

A model given on the CPU already holds its values. A model built on the ``meta`` device (so that a 70B
model never exists whole in one process) is initialised one FSDP unit at a time: a CPU copy of that
decoder block (or root leaf module) is materialised, initialised with the model's own ``_init_weights``
under a seed derived from the unit, sliced to this rank's shard, and dropped. Every rank draws the same
full tensors, so the shards agree whatever the world size. Host memory beyond the state store: one
unit in fp32 (the largest of a block and the embedding).
"""

from __future__ import annotations

import copy
import zlib

import torch
from torch import nn

from heavylift.shard.layout import local_shard


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


class MaterializedValues:
    """Values of a model whose parameters are real tensors (on the CPU)."""

    def __init__(self, model: nn.Module, rank: int, world: int):
        self._params = dict(model.named_parameters())
        self._rank, self._world = rank, world

    def shard(self, name: str) -> torch.Tensor:
        return local_shard(self._params[name].detach(), self._rank, self._world)

    def close(self) -> None:
        self._params = {}


class MetaInitValues:
    """Values drawn by the model's ``_init_weights``, one owning module at a time, on the CPU."""

    def __init__(self, model: nn.Module, rank: int, world: int, seed: int, units: list[nn.Module]):
        self._model = model
        self._rank, self._world, self._seed = rank, world, seed
        unit_ids = {id(u) for u in units}
        self._owner: dict[str, nn.Module] = {}  # parameter name -> module to materialise for it
        self._owner_name: dict[int, str] = {}
        seen: set[int] = set()
        for mod_name, module in model.named_modules():
            if id(module) in unit_ids:
                self._claim(module, mod_name, seen)
        for mod_name, module in model.named_modules():
            if module._parameters and not any(id(p) in seen for p in module.parameters(recurse=False)):
                self._claim(module, mod_name, seen, recurse=False)
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None

    def _claim(self, module: nn.Module, mod_name: str, seen: set[int], recurse: bool = True) -> None:
        self._owner_name[id(module)] = mod_name
        ids = {id(p): n for n, p in self._model.named_parameters()}
        for p in module.parameters(recurse=recurse):
            if id(p) in seen:
                continue
            seen.add(id(p))
            self._owner[ids[id(p)]] = module

    def shard(self, name: str) -> torch.Tensor:
        module = self._owner[name]
        if self._cached is None or self._cached[0] != id(module):
            self._cached = (id(module), self._materialize(module))
        return local_shard(self._cached[1][name], self._rank, self._world)

    def _materialize(self, module: nn.Module) -> dict[str, torch.Tensor]:
        prefix = self._owner_name[id(module)]
        names = {id(p): n for n, p in self._model.named_parameters()}
        cpu = copy.deepcopy(module).to_empty(device="cpu").float()
        seed = (self._seed * 1_000_003 + zlib.crc32(prefix.encode())) % 2**63
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.no_grad():
                cpu.apply(self._model._init_weights)
        out = {}
        for (local_name, p_meta), p_cpu in zip(module.named_parameters(), cpu.parameters(), strict=True):
            if id(p_meta) in names:
                out[names[id(p_meta)]] = p_cpu.detach()
        return out

    def close(self) -> None:
        self._cached = None


@torch.no_grad()
def init_buffers(model: nn.Module, device: torch.device) -> None:
    """After ``to_empty`` the buffers hold garbage: recompute those of parameter-free modules (rotary
    frequencies) with the model's own initialiser."""
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        if list(module.buffers(recurse=False)) and not list(module.parameters(recurse=False)) and init:
            init(module)


def safetensors_weight_map(directory: str) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it, from a directory ``save_pretrained`` wrote (a
    sharded index or one ``model.safetensors``); reads headers only."""
    import json
    import os

    from safetensors import safe_open

    from heavylift.config.errors import HeavyliftError

    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    elif os.path.exists(single):
        with safe_open(single, framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise HeavyliftError(f"{directory}: no model.safetensors or model.safetensors.index.json: "
                             "point to a directory written by save_pretrained(safe_serialization=True)")
    return {k: os.path.join(directory, v) for k, v in weight_map.items()}


class SafetensorsValues:
    """Values read from a Hugging Face safetensors checkpoint, only this rank's rows of each tensor
    (``get_slice``), so a model larger than host RAM never has to be loaded whole."""

    def __init__(self, directory: str, rank: int, world: int):
        from safetensors import safe_open

        from heavylift.config.errors import HeavyliftError

        self._rank, self._world = rank, world
        self._files = safetensors_weight_map(directory)
        self._open: dict[str, object] = {}
        self._safe_open = safe_open
        self._missing_error = HeavyliftError

    def shard(self, name: str) -> torch.Tensor:
        from heavylift.shard.layout import shard_row_range

        path = self._files.get(name)
        if path is None:
            raise self._missing_error(f"checkpoint has no tensor '{name}' that the model needs")
        if path not in self._open:
            # One file mapped at a time: the pages read stay in this process's RSS while it is mapped.
            self._open.clear()
            self._open[path] = self._safe_open(path, framework="pt")
        sl = self._open[path].get_slice(name)
        shape = sl.get_shape()
        if not shape:
            return local_shard(sl[...], self._rank, self._world).float()
        start, stop = shard_row_range(shape[0], self._rank, self._world)
        return sl[start:stop].float()

    def close(self) -> None:
        self._open.clear()
