"""Architecture presets: stock HF configs of well-known shapes, randomly initialised (on ``meta`` for benchmarks)."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel, Qwen3Config

from heavylift.config.errors import HeavyliftError
from heavylift.models.load import prepare_for_training


def _llama(hidden: int, layers: int, ffn: int, heads: int, kv: int, vocab: int, tied: bool = False,
           theta: float = 500_000.0, max_pos: int = 8192) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": theta},
                       max_position_embeddings=max_pos, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None)


def _qwen3(hidden: int, layers: int, ffn: int, heads: int, kv: int, tied: bool) -> Qwen3Config:
    return Qwen3Config(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, vocab_size=151_936,
                       tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                       max_position_embeddings=40_960)


PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    # vocab 512 covers heavylift's byte-level debug tokenizer (259 ids).
    "tiny": lambda: _llama(64, 2, 128, 4, 2, 512, tied=True, theta=10_000.0, max_pos=2048),
    "llama-3-8b": lambda: _llama(4096, 32, 14336, 32, 8, 128_256),
    "llama-3-70b": lambda: _llama(8192, 80, 28672, 64, 8, 128_256),
    "qwen3-4b": lambda: _qwen3(2560, 36, 9728, 32, 8, tied=True),
    "qwen3-14b": lambda: _qwen3(5120, 40, 17408, 40, 8, tied=False),
    "qwen3-32b": lambda: _qwen3(5120, 64, 25600, 64, 8, tied=False),
}


def preset_config(name: str) -> PretrainedConfig:
    if name not in PRESETS:
        raise HeavyliftError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    config = PRESETS[name]()
    config._attn_implementation = "sdpa"
    return config


def build_preset(name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> PreTrainedModel:
    """The preset's model with random weights; on ``meta`` nothing is allocated (the engine materialises it)."""
    config = preset_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return prepare_for_training(model)
