"""Compiled blocks in bf16 on a GPU: judged against the fp32 model, they must be no further from it than
the stock bf16 model is (fused kernels skip some of the stock model's intermediate bf16 roundings, so
compiled and stock bf16 differ from each other by about as much as either differs from fp32)."""

from __future__ import annotations

import pytest
import torch

from heavylift.shard.compile import compile_blocks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    return Qwen3ForCausalLM(cfg).to("cuda", dtype)


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.float().item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


def test_compiled_bf16_is_as_close_to_fp32_as_stock_bf16():
    truth, stock, compiled = _model(torch.float32), _model(torch.bfloat16), _model(torch.bfloat16)
    compile_blocks(list(compiled.model.layers))
    worst = {"stock": 0.0, "compiled": 0.0}
    for step in range(3):
        ids = torch.randint(0, 2048, (2, 512), generator=torch.Generator().manual_seed(step)).cuda()
        lt, gt = _grads(truth, ids)
        for name, m in (("stock", stock), ("compiled", compiled)):
            loss, g = _grads(m, ids)
            rel = ((g - gt).norm() / gt.norm()).item()
            worst[name] = max(worst[name], rel)
            assert abs(loss - lt) < 0.02 * abs(lt), (name, loss, lt)
    print(f"gradient error against fp32: stock bf16 {worst['stock']:.3e}, compiled bf16 {worst['compiled']:.3e}")
    assert worst["compiled"] <= 1.25 * worst["stock"] + 1e-3


# The ops the CUDA SDPA kernels call to do the work (the outer op only transposes and calls one): they run
# only when the kernel really runs, never when a recompute is served from the selective checkpoint's cache.
CUDA_ATTENTION_WORK = {"aten::_flash_attention_forward", "aten::_efficient_attention_forward",
                       "aten::_cudnn_attention_forward"}


def _attention_runs(step) -> tuple[int, set[str], bool]:
    """Runs of an SDPA kernel in ``step`` (forward and recompute; not its backward), which ops they were, and
    whether compiled code ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    runs = [e.name for e in prof.events() if e.name in CUDA_ATTENTION_WORK]
    compiled = any("Compiled" in e.name for e in prof.events())
    return len(runs), set(runs), compiled


def test_save_attention_with_compiled_blocks_skips_the_rerun_and_keeps_the_gradients():
    """engine.save_attention on a GPU, where the attention child is compiled: the checkpoint's selective
    policy must see inductor's SDPA call, the kernel must run once per forward instead of twice, and the
    gradients must be those of the plain checkpoint (the cached output is what the rerun would compute;
    the flash backward may add in another order, so a bf16-sized tolerance)."""
    from heavylift.shard.selective import checkpoint_kwargs

    result = {}
    for save in (False, True):
        m = _model(torch.bfloat16)
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(save))
        compile_blocks(list(m.model.layers))
        ids = torch.randint(0, 2048, (2, 512), generator=torch.Generator().manual_seed(0)).cuda()
        _grads(m, ids)  # compiles
        out = {}
        runs = _attention_runs(lambda: out.update(zip(("loss", "grads"), _grads(m, ids))))
        result[save] = (runs, out["loss"], out["grads"])
    (plain_runs, plain_kernels, _), plain_loss, plain_grads = result[False]
    (saved_runs, saved_kernels, compiled), saved_loss, saved_grads = result[True]
    print(f"SDPA kernel runs: plain {plain_runs} {plain_kernels}, saved {saved_runs} {saved_kernels}; compiled {compiled}")
    assert compiled  # the policy saw the attention inside compiled code, not an eager fallback
    assert plain_runs == 2 * saved_runs and saved_runs == 4  # 4 layers: forward + rerun against forward alone
    assert plain_loss == saved_loss
    assert ((saved_grads - plain_grads).norm() / plain_grads.norm()).item() < 1e-2
