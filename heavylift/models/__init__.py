"""Models: a local HF directory, the embedded default, or an architecture preset; all stock HF classes."""

from __future__ import annotations

import pathlib

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from heavylift.config.errors import HeavyliftError
from heavylift.models.default import load_default
from heavylift.models.load import load_pretrained, load_tokenizer
from heavylift.models.presets import PRESETS, build_preset
from heavylift.models.tokenizer import byte_tokenizer

__all__ = ["PRESETS", "build_preset", "byte_tokenizer", "load_default", "load_model", "load_pretrained"]


def load_model(spec: str, tokenizer: str = "", device: str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``"default"``, a preset name, or a local directory; ``tokenizer`` (a directory) overrides the model's."""
    if spec == "default":
        model, tok = load_default(dtype)
    elif spec in PRESETS:
        model, tok = build_preset(spec, device=device, dtype=dtype, seed=seed), byte_tokenizer()
    elif "/" not in spec and not pathlib.Path(spec).exists():
        raise HeavyliftError(f"model {spec!r} is neither 'default', a preset ({', '.join(PRESETS)}) "
                             "nor an existing directory")
    else:
        return load_pretrained(spec, dtype, tokenizer or None)
    return model, (load_tokenizer(tokenizer) if tokenizer else tok)
