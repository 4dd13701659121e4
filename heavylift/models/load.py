"""Load a stock Hugging Face causal LM and its tokenizer from local directories (safetensors).

``load_pretrained`` reads the whole model into this process; ``load_lazily`` builds it on the ``meta``
device and leaves the weights in the directory, for the engine to stream each rank's rows from
(``heavylift.initialize(weights=...)``), so that no process ever holds the whole model.
"""

from __future__ import annotations

import logging
import pathlib

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from heavylift.config.errors import HeavyliftError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

log = logging.getLogger("heavylift")


def load_pretrained(path: str | pathlib.Path, dtype: torch.dtype = torch.float32,
                    tokenizer: str | pathlib.Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``AutoModelForCausalLM`` from ``path`` (offline, SDPA, no KV cache) and the tokenizer in ``tokenizer``
    (default: the same directory)."""
    root, tok, config = _model_dir(path, tokenizer)
    try:
        model = AutoModelForCausalLM.from_pretrained(root, config=config, dtype=dtype, attn_implementation="sdpa",
                                                     local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise HeavyliftError(f"cannot load the model in {str(root)!r}: {str(e).splitlines()[0]}") from e
    return prepare_for_training(model), tok


def load_lazily(path: str | pathlib.Path, dtype: torch.dtype = torch.float32,
                tokenizer: str | pathlib.Path | None = None
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str | None]:
    """``(model, tokenizer, weights)``: the model of ``path`` on the ``meta`` device and ``weights``, the
    directory the engine streams each rank's rows from. Where streaming cannot give what
    ``from_pretrained`` would (checkpoint names that transformers converts while loading, persistent
    buffers), the model is loaded whole instead, with a warning, and ``weights`` is None."""
    root, tok, config = _model_dir(path, tokenizer)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    except (ValueError, KeyError) as e:
        raise HeavyliftError(f"cannot build the model of {str(root)!r}: {str(e).splitlines()[0]}") from e
    why = _not_streamable(model, str(root))
    if why:
        log.warning("model %s is loaded whole on every rank (%s); expect a full copy per rank in host RAM", root, why)
        return load_pretrained(root, dtype, tokenizer) + (None,)
    return prepare_for_training(model), tok, str(root)


def _not_streamable(model: PreTrainedModel, directory: str) -> str:
    """Why streaming the checkpoint by parameter name would not reproduce ``from_pretrained``, or ''."""
    from heavylift.shard.values import safetensors_weight_map

    names = set(safetensors_weight_map(directory))
    missing = [n for n, _ in model.named_parameters() if n not in names]
    if missing:
        return (f"{len(missing)} parameter(s), e.g. {missing[0]!r}, are not checkpoint tensors of that name "
                "(transformers converts this checkpoint while loading)")
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    persistent = [n for n in model.state_dict(keep_vars=True) if n not in params]
    if persistent:
        return f"it has persistent buffers ({persistent[0]!r}), which are not streamed"
    for name, module in model.named_modules():
        if list(module.buffers(recurse=False)) and list(module.parameters(recurse=False)):
            return f"module {name!r} has parameters and buffers, whose values only its full load computes"
    return ""


def _model_dir(path, tokenizer) -> tuple[pathlib.Path, PreTrainedTokenizerBase, object]:
    root = _existing_dir(path, "model")
    if not (root / "config.json").is_file():
        raise HeavyliftError(f"model directory {str(root)!r} has no config.json")
    if not any(root.glob("*.safetensors")):
        raise HeavyliftError(f"model directory {str(root)!r} has no *.safetensors weights")
    tok = load_tokenizer(tokenizer or root)
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise HeavyliftError(f"cannot load the model in {str(root)!r}: {str(e).splitlines()[0]}") from e
    return root, tok, config


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
