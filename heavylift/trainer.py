"""The training loop and held-out evaluation, against the DeepSpeed-shaped engine API."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from heavylift.data.formats import IGNORE
from heavylift.metrics import MetricsLog, PhaseTimer, flops_metrics, host_rss_bytes, pinned_bytes
from heavylift.shard.recompute import checkpointed


@dataclass
class EvalResult:
    loss: float        # mean cross-entropy per response token
    accuracy: float    # share of samples whose every response token is the argmax (= greedy exact match)
    tokens: int
    samples: int


def token_stats(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """[summed loss, loss tokens, exactly-right samples, samples] of one packed batch (pure function).

    A sample is right when the argmax at every response position is the label there: greedy decoding
    from its prompt would then write exactly the reference answer.
    """
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    scored = targets != IGNORE
    wrong = scored & (logits.argmax(-1) != targets)
    sample = (position_ids == 0).cumsum(1)[:, 1:]  # sample index within each row, aligned with targets
    sample = sample + torch.arange(len(sample), device=sample.device)[:, None] * (sample.max() + 1)
    has_target = torch.zeros(int(sample.max()) + 1, dtype=torch.bool, device=sample.device)
    has_wrong = torch.zeros_like(has_target)
    has_target[sample[scored]] = True
    has_wrong[sample[wrong]] = True
    return torch.tensor([loss.item(), scored.sum().item(), (has_target & ~has_wrong).sum().item(),
                         has_target.sum().item()], dtype=torch.float64)


@torch.no_grad()
def evaluate(engine, batches: Iterator[dict[str, torch.Tensor]]) -> EvalResult:
    engine.eval()
    total = torch.zeros(4, dtype=torch.float64)
    for batch in batches:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        logits = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        total += token_stats(logits, batch["labels"], batch["position_ids"])
    engine.train()
    total = _sum_over_ranks(total, engine.device)
    loss, tokens, right, samples = total.tolist()
    return EvalResult(loss / max(tokens, 1), right / max(samples, 1), int(tokens), int(samples))


def train(engine, optimizer, loader: Iterator[dict[str, torch.Tensor]], steps: int, grad_accum: int,
          log: MetricsLog, log_every: int = 1, eval_every: int = 0, eval_fn=None, progress=None,
          peak_tflops: float | None = None, start_step: int = 0, save_every: int = 0, save_fn=None,
          preempt=None) -> list[dict]:
    """Optimizer steps ``start_step + 1 .. steps`` of ``grad_accum`` micro-batches each; returns the logged
    records. ``save_fn(step)`` runs every ``save_every`` steps, at the last step, and when ``preempt``
    (a SIGTERM/SIGINT flag agreed by all ranks) asks to stop, after which the loop ends.

    ``peak_tflops`` (per GPU) turns the logged model TFLOP/s into an MFU; see ``metrics.flops_metrics``.
    """
    engine.train()
    batches, records = iter(loader), []
    shape = _model_shape(getattr(engine, "module", None))
    pinned = pinned_bytes(getattr(engine, "buckets", []))
    pipeline = getattr(engine, "pipeline", None)
    cuda = engine.device.type == "cuda"
    retries0 = _alloc_retries(engine.device) if cuda else 0
    for step in range(start_step + 1, steps + 1):
        start, tokens, losses = time.perf_counter(), 0, []
        wait0 = pipeline.wait_seconds if pipeline is not None else 0.0
        link0 = pipeline.link_bytes() if pipeline is not None else 0
        lr = optimizer.param_groups[0]["lr"]
        phases = PhaseTimer(cuda)
        for _ in range(grad_accum):
            batch = {k: v.to(engine.device) for k, v in next(batches).items()}
            phases.mark()
            loss = engine(**batch).loss
            phases.mark()
            engine.backward(loss)
            phases.mark()
            engine.step()
            losses.append(loss.detach().float())
            tokens += batch["input_ids"].numel()
        if step % log_every == 0 or step == steps:
            elapsed = time.perf_counter() - start
            result = engine.last_step
            # tokens_per_s counts every position the model computed, the padding at row ends included.
            record = {"loss": _mean_over_ranks(torch.stack(losses).mean(), engine.device), "lr": lr,
                      "grad_norm": float(result.grad_norm), "skipped": bool(result.skipped),
                      "tokens_per_s": tokens * _world() / elapsed, "step_time_s": elapsed}
            record["forward_s"], record["backward_s"] = phases.split()
            if shape is not None:
                recompute = _recompute_share(engine)
                record.update(flops_metrics(tokens / elapsed, *shape, batch["input_ids"].shape[1],
                                            peak_tflops, recompute))
            if cuda:
                record["gpu_peak_mem_gib"] = torch.cuda.max_memory_allocated(engine.device) / 2**30
                # the caching allocator freed its cache and retried an allocation: a slow step's usual cause
                # on a card filled to its margin (session 3's unexplained step-8 dip after an eval)
                retries = _alloc_retries(engine.device)  # read once per logged step, after its time
                record["alloc_retries"], retries0 = retries - retries0, retries
            record["host_rss_gib"] = host_rss_bytes() / 2**30
            record["pinned_gib"] = pinned / 2**30
            if pipeline is not None:  # forward time blocked on the overlapped CPU optimizer, this step
                record["optim_wait_s"] = pipeline.wait_seconds - wait0
                record["link_gbs"] = (pipeline.link_bytes() - link0) / elapsed / 1e9  # both ways, this rank
            log.log(step, record)
            records.append({"step": step, **record})
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.3f}", gnorm=f"{record['grad_norm']:.2f}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
        if eval_fn is not None and eval_every and step % eval_every == 0 and step != steps:
            log.log(step, {"eval_loss": eval_fn().loss})
        if progress is not None:
            progress.update(1)
        stop = preempt is not None and preempt.should_stop(engine.device)  # collective: every rank, every step
        if save_fn is not None and (stop or step == steps or (save_every and step % save_every == 0)):
            save_fn(step)
        if stop:
            break
    return records


def _alloc_retries(device: torch.device) -> int:
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


def _recompute_share(engine) -> float:
    """The share of blocks that recompute their activations in backward (for hardware FLOPs)."""
    blocks = getattr(engine, "blocks", None)
    if blocks:
        return sum(checkpointed(b) for b in blocks) / len(blocks)
    return float(bool(getattr(getattr(engine, "config", None), "activation_checkpointing", False)))


def _model_shape(model) -> tuple[int, int, int] | None:
    """(matmul parameters N, layers L, hidden size h) of a Hugging Face model, or None if it has no such config.

    N leaves out the input embedding table (a lookup) unless it is tied to the output head (a matmul).
    """
    config = getattr(model, "config", None)
    layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    if not layers or not hidden:
        return None
    n = sum(p.numel() for p in model.parameters())
    try:
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        if embed is not None and (head is None or head.weight is not embed.weight):
            n -= embed.weight.numel()
    except (AttributeError, NotImplementedError):
        pass
    return n, layers, hidden


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _sum_over_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """All-reduce on the engine's device (NCCL takes only CUDA tensors); returns a CPU tensor."""
    if _world() > 1:
        t = t.to(device)
        dist.all_reduce(t)
    return t.cpu()


def _mean_over_ranks(t: torch.Tensor, device: torch.device) -> float:
    return float(_sum_over_ranks(t.detach().double().reshape(1), device).item() / _world())
