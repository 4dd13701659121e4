"""Model shapes for the planner: from a preset, an HF config directory or a model object."""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass

from heavylift.config.errors import HeavyliftError


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model: per-parameter shapes per FSDP unit and the dimensions."""

    name: str
    units: tuple[tuple[tuple[int, ...], ...], ...]  # blocks in forward order, then the root unit
    layers: int
    hidden: int
    ffn: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # kv heads x head_dim
    vocab: int
    qk_norm: bool = False
    heads: int = 0  # attention (query) heads; 0: not known (the planner then assumes 64-wide heads)

    @property
    def params(self) -> int:
        return sum(math.prod(s) for unit in self.units for s in unit)

    @property
    def root_params(self) -> int:
        return sum(math.prod(s) for s in self.units[-1])

    @property
    def max_block_params(self) -> int:
        return max((sum(math.prod(s) for s in u) for u in self.units[:-1]), default=0)

    @property
    def max_unit_params(self) -> int:
        """The most a meta model's initialisation holds at once: a whole block, or one root tensor (the
        root unit's leaf modules are drawn one by one; see shard/values.py)."""
        return max(self.max_block_params, max((math.prod(s) for s in self.units[-1]), default=0))


def _default_model_config():
    """SmolLM2-135M-Instruct (the embedded default model), without reading its GGUF file."""
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                       max_position_embeddings=8192, rms_norm_eps=1e-5)


def resolve_config(spec):
    """A ``PretrainedConfig`` from a preset name, "default", an HF model directory, or a config object."""
    from transformers import PretrainedConfig
    if isinstance(spec, PretrainedConfig):
        return spec
    from heavylift.models.presets import PRESETS, preset_config
    if spec == "default":
        return _default_model_config()
    if spec in PRESETS:
        return preset_config(spec)
    path = pathlib.Path(str(spec))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HeavyliftError(f"model directory {str(path)!r} has no config.json")
        from transformers import AutoConfig
        try:
            return AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise HeavyliftError(f"cannot read {str(path / 'config.json')!r}: {str(e).splitlines()[0]}") from e
    raise HeavyliftError(f"model {spec!r} is neither 'default', a preset ({', '.join(PRESETS)}) "
                         "nor a directory with a config.json")


def model_shape(spec) -> ModelShape:
    """The shape of ``spec`` (see :func:`resolve_config`), from a ``meta``-device model (no storage)."""
    import torch
    from transformers import AutoModelForCausalLM
    config = resolve_config(spec)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise HeavyliftError(f"cannot build a causal LM from the config of {getattr(spec, 'name_or_path', spec)!r}: "
                             f"{str(e).splitlines()[0]}") from e
    return shape_of_model(model, name=str(spec) if isinstance(spec, (str, os.PathLike)) else
                          (config.name_or_path or config.model_type))


def shape_of_model(model, name: str = "") -> ModelShape:
    """The shape of an instantiated model (any device), its FSDP units found as the engine finds them."""
    from heavylift.shard.fsdp import find_blocks
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    blocks = find_blocks(model)
    unit_of = {}
    for u, block in enumerate(blocks):
        for p in block.parameters():
            unit_of[id(p)] = u
    units: list[list[tuple[int, ...]]] = [[] for _ in range(len(blocks) + 1)]
    for _, p in model.named_parameters():
        if p.requires_grad:
            units[unit_of.get(id(p), len(blocks))].append(tuple(p.shape))
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(name=name or type(model).__name__, units=tuple(tuple(u) for u in units),
                      layers=len(blocks), hidden=hidden, ffn=getattr(text, "intermediate_size", 4 * hidden),
                      q_dim=heads * head_dim, kv_dim=kv * head_dim, vocab=text.vocab_size,
                      qk_norm=getattr(text, "model_type", "") in ("qwen3", "qwen3_moe", "olmo2", "gemma3"),
                      heads=heads)
