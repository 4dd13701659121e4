"""Selective recompute and compiled blocks leave the model's numbers alone (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from heavylift.shard.compile import compile_blocks, wanted
from heavylift.shard.recompute import blocks_to_uncheck, checkpointed, set_checkpointed


def _pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97)
    a, b = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    b.load_state_dict(a.state_dict())
    return a, b


def _loss_and_grads(model, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_unchecking_some_blocks_changes_nothing_but_memory():
    a, b = _pair()
    for m in (a, b):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = list(b.model.layers)
    assert all(checkpointed(x) for x in layers)
    set_checkpointed(layers[-1], False)
    set_checkpointed(layers[0], False)
    assert [checkpointed(x) for x in layers] == [False, True, False]
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    la, ga = _loss_and_grads(a, ids)
    lb, gb = _loss_and_grads(b, ids)
    assert torch.equal(la, lb)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


def test_set_checkpointed_refuses_a_module_without_the_switch():
    with pytest.raises(TypeError, match="gradient_checkpointing"):
        set_checkpointed(torch.nn.Linear(2, 2), False)


def test_blocks_to_uncheck_counts_whole_blocks_with_margin():
    GiB = 2**30
    assert blocks_to_uncheck(10 * GiB, 1 * GiB) == 8  # 10 / 1.15
    assert blocks_to_uncheck(1 * GiB, 1 * GiB) == 0
    assert blocks_to_uncheck(-1, 1 * GiB) == 0
    assert blocks_to_uncheck(10 * GiB, 0) == 0  # a probe that measured nothing decides nothing


def test_compile_auto_only_on_cuda():
    assert wanted("auto", torch.device("cuda", 0)) and not wanted("auto", torch.device("cpu"))
    assert wanted("on", torch.device("cpu")) and not wanted("off", torch.device("cuda", 0))


def test_compiled_blocks_match_the_stock_model():
    """Inductor on CPU (C++ codegen): the fused norms, rotary and MLP give the stock model's loss and
    gradients to fp32 rounding."""
    a, b = _pair()
    assert compile_blocks(list(b.model.layers)) == 3 * 4  # two norms, attention, MLP per block
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    la, ga = _loss_and_grads(a, ids)
    lb, gb = _loss_and_grads(b, ids)
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-6)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-6), n
