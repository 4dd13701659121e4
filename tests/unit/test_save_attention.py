"""engine.save_attention: recomputing blocks keep the attention kernel's output, run it once per forward
instead of twice, and give the same bits (CPU)."""

from __future__ import annotations

import pytest
import torch

import heavylift
from heavylift.config import EngineConfig
from heavylift.memory.plan import Setup, plan
from heavylift.memory.model import model_shape
from heavylift.shard.selective import ATTENTION_OPS, checkpoint_kwargs, saved_bytes_per_token
from tests.support.equivalence import tiny_model

CPU_KERNEL = "aten::_scaled_dot_product_flash_attention_for_cpu"


def _attention_runs(fn) -> int:
    """How many times ``fn`` runs the CPU attention kernel (forward and recompute; not its backward): the
    kernel's profiler events that allocate an output. Under the checkpoint's dispatch modes the op also
    shows as an outer event around the mode, and in a recompute served from the cache with no allocation."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events()
               if e.name == CPU_KERNEL and any(c.name.startswith("aten::empty") for c in e.cpu_children))


def _grads(save: bool):
    model = tiny_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(save))
    model.train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    runs = _attention_runs(step)
    return runs, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_attention_runs_once_per_forward_and_the_gradients_keep_their_bits():
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in ATTENTION_OPS
    plain_runs, plain = _grads(False)
    saved_runs, saved = _grads(True)
    layers = tiny_model().config.num_hidden_layers
    assert plain_runs == 2 * layers and saved_runs == layers  # forward + recompute, against forward alone
    for n in plain:
        assert torch.equal(plain[n], saved[n]), n


def test_the_engine_trains_the_same_bits_with_it():
    def masters(save: bool):
        ec = EngineConfig()
        ec.precision.dtype = "fp32"
        ec.save_attention = save
        engine = heavylift.initialize(model=tiny_model(), config=ec)[0]
        try:
            g = torch.Generator().manual_seed(2)
            for _ in range(2):
                ids = torch.randint(0, 64, (2, 16), generator=g)
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()
            return engine.master_weights()
        finally:
            engine.close()

    plain, saved = masters(False), masters(True)
    assert all(torch.equal(plain[n], saved[n]) for n in plain)


def test_the_planner_counts_the_saved_outputs():
    shape = model_shape("qwen3-4b")
    off, on = (plan(shape, Setup(seq=4096, mbs=4, save_attention=s)) for s in (False, True))
    assert (shape.heads, shape.q_dim) == (32, 4096)  # qwen3-4b: 32 heads of 128
    # per token and block: the bf16 output and one fp32 log-sum-exp per head (64-wide heads where not known)
    assert saved_bytes_per_token(4096, 32) == 2 * 4096 + 4 * 32 and saved_bytes_per_token(4096) == 2 * 4096 + 4 * 64
    extra = shape.layers * 4 * 4096 * (2 * 4096 + 4 * 32)
    name = "activations: stored block inputs + attention outputs"
    assert on.gpu[name] - off.gpu["activations: stored block inputs"] == extra
    assert on.gpu_peak - off.gpu_peak == extra


def test_it_is_refused_without_activation_checkpointing():
    from heavylift.config.errors import ConfigError
    from heavylift.config.schema import validate

    ec = EngineConfig()
    ec.activation_checkpointing, ec.save_attention = False, True
    with pytest.raises(ConfigError, match="save_attention.*activation_checkpointing is off"):
        validate(ec)


def test_it_is_refused_for_a_model_that_trains_with_dropout():
    from heavylift.config.errors import HeavyliftError
    from heavylift.shard.selective import dropout_in

    assert dropout_in(tiny_model()) is None
    model = tiny_model()
    model.config.attention_dropout = 0.1
    assert dropout_in(model) == "config.attention_dropout = 0.1"
    model = tiny_model()
    model.model.layers[1].mlp.drop = torch.nn.Dropout(0.2)
    assert "model.layers.1.mlp.drop (Dropout, p = 0.2)" == dropout_in(model)
    ec = EngineConfig()
    ec.precision.dtype, ec.save_attention = "fp32", True
    with pytest.raises(HeavyliftError, match="save_attention: the model trains with dropout.*Set engine.save_attention false"):
        heavylift.initialize(model=model, config=ec)
