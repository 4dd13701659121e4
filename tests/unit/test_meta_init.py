"""A model built on the meta device is initialised unit by unit into the host store and the shards."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import heavylift
from heavylift.config import EngineConfig


def meta_model() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def fp32_config() -> EngineConfig:
    ec = EngineConfig()
    ec.precision.dtype = "fp32"
    ec.activation_checkpointing = False
    return ec


def init_masters(world_hint: str = "") -> dict[str, torch.Tensor]:
    engine = heavylift.initialize(model=meta_model(), config=fp32_config())[0]
    out = engine.master_weights()
    engine.close()
    return out


def test_meta_model_initialises_like_hf_and_runs():
    model = meta_model()
    engine = heavylift.initialize(model=model, config=fp32_config())[0]
    masters = engine.master_weights()
    std = masters["model.layers.0.mlp.up_proj.weight"].std().item()
    assert abs(std - 0.02) < 0.004  # HF's normal(0, initializer_range)
    assert torch.equal(masters["model.norm.weight"], torch.ones(32))
    ref = LlamaForCausalLM(model.config)
    ref.load_state_dict(masters, strict=False)
    ref.tie_weights()
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        mine = engine(input_ids=ids, labels=ids).loss
        theirs = ref(input_ids=ids, labels=ids).loss
    assert torch.allclose(mine, theirs, rtol=1e-6, atol=1e-6), (mine, theirs)
    engine.close()


def test_meta_init_is_deterministic():
    a, b = init_masters(), init_masters()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weights_streamed_from_safetensors_shard_by_shard(tmp_path):
    torch.manual_seed(3)
    real = LlamaForCausalLM(meta_model().config)
    real.save_pretrained(tmp_path, safe_serialization=True)
    engine = heavylift.initialize(model=meta_model(), config=fp32_config(), weights=str(tmp_path))[0]
    masters = engine.master_weights()
    expected = dict(real.named_parameters())
    assert masters.keys() == expected.keys()
    assert all(torch.equal(masters[k], expected[k].detach()) for k in masters)
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        assert torch.allclose(engine(input_ids=ids).logits, real(input_ids=ids).logits, atol=1e-5)
    engine.close()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    import pytest

    from heavylift.config import HeavyliftError

    with pytest.raises(HeavyliftError, match="no model.safetensors"):
        heavylift.initialize(model=meta_model(), config=fp32_config(), weights=str(tmp_path))
