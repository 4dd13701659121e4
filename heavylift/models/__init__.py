"""Models: a local HF directory, the embedded default, or an architecture preset; all stock HF classes."""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from heavylift.config.errors import HeavyliftError
from heavylift.models.default import load_default
from heavylift.models.load import load_lazily, load_pretrained, load_tokenizer
from heavylift.models.presets import PRESETS, build_preset
from heavylift.models.tokenizer import byte_tokenizer

__all__ = ["PRESETS", "Loaded", "build_preset", "byte_tokenizer", "load_default", "load_model", "load_pretrained"]


class Loaded(NamedTuple):
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    weights: str | None = None  # a safetensors directory to stream a meta model's values from (initialize)


def load_model(spec: str, tokenizer: str = "", device: str = "meta", dtype: torch.dtype = torch.float32,
               seed: int = 0) -> Loaded:
    """``"default"``, a preset name, or a local directory; ``tokenizer`` (a directory) overrides the model's.

    On ``meta`` (what ``heavylift train`` uses) no process holds the whole model: a preset's values are drawn
    by the engine one FSDP unit at a time (with ``engine.seed``), a directory's are streamed by the engine,
    each rank reading only its rows. On ``cpu`` the model is built (``seed``) or loaded whole. The embedded
    default (a GGUF file, 135 M parameters) is always loaded whole."""
    if spec == "default":
        model, tok = load_default(dtype)
    elif spec in PRESETS:
        model, tok = build_preset(spec, device=device, dtype=dtype, seed=seed), byte_tokenizer()
    elif "/" not in spec and not pathlib.Path(spec).exists():
        raise HeavyliftError(f"model {spec!r} is neither 'default', a preset ({', '.join(PRESETS)}) "
                             "nor an existing directory")
    elif device == "meta":
        return Loaded(*load_lazily(spec, dtype, tokenizer or None))
    else:
        return Loaded(*load_pretrained(spec, dtype, tokenizer or None))
    return Loaded(model, load_tokenizer(tokenizer) if tokenizer else tok)
