"""Load a stock Hugging Face causal LM and its tokenizer from local directories (safetensors)."""

from __future__ import annotations

import pathlib

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from heavylift.config.errors import HeavyliftError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_pretrained(path: str | pathlib.Path, dtype: torch.dtype = torch.float32,
                    tokenizer: str | pathlib.Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``AutoModelForCausalLM`` from ``path`` (offline, SDPA, no KV cache) and the tokenizer in ``tokenizer``
    (default: the same directory)."""
    root = _existing_dir(path, "model")
    if not (root / "config.json").is_file():
        raise HeavyliftError(f"model directory {str(root)!r} has no config.json")
    if not any(root.glob("*.safetensors")):
        raise HeavyliftError(f"model directory {str(root)!r} has no *.safetensors weights")
    tok = load_tokenizer(tokenizer or root)
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(root, config=config, dtype=dtype, attn_implementation="sdpa",
                                                     local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise HeavyliftError(f"cannot load the model in {str(root)!r}: {str(e).splitlines()[0]}") from e
    return prepare_for_training(model), tok


def load_tokenizer(path: str | pathlib.Path) -> PreTrainedTokenizerBase:
    root = _existing_dir(path, "tokenizer")
    if not any((root / name).is_file() for name in _TOKENIZER_FILES):
        raise HeavyliftError(f"directory {str(root)!r} has no tokenizer (tokenizer.json or tokenizer.model); "
                             "point --tokenizer at one")
    try:
        return AutoTokenizer.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise HeavyliftError(f"cannot load the tokenizer in {str(root)!r}: {str(e).splitlines()[0]}") from e


def prepare_for_training(model: PreTrainedModel) -> PreTrainedModel:
    """Training never wants a KV cache; without one, HF also isolates packed samples by ``position_ids``."""
    model.config.use_cache = False
    return model


def _existing_dir(path: str | pathlib.Path, what: str) -> pathlib.Path:
    root = pathlib.Path(path)
    if not root.is_dir():
        raise HeavyliftError(f"{what} directory {str(root)!r} does not exist"
                             + (" (give a local directory, 'default' or a preset name)" if what == "model" else ""))
    return root
