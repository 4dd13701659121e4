"""The chunked causal-LM loss equals the stock one (value and gradients) to fp32 summation order."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from heavylift.models.loss import chunked_causal_lm_loss


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_chunked_loss_matches_stock_loss_and_gradients(chunk):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    stock = LlamaForCausalLM(cfg)
    mine = LlamaForCausalLM(cfg)
    mine.load_state_dict(stock.state_dict())
    mine.loss_function = chunked_causal_lm_loss(chunk)
    ids = torch.randint(0, 300, (3, 40))
    labels = ids.clone()
    labels[0, :10] = -100  # a masked prompt
    a = stock(input_ids=ids, labels=labels).loss
    b = mine(input_ids=ids, labels=labels).loss
    a.backward()
    b.backward()
    assert torch.allclose(a, b, rtol=1e-6, atol=0), (a, b)
    for (n, p), q in zip(stock.named_parameters(), mine.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), n
