"""``heavylift.initialize``: wrap a stock HF model in FSDP2 + the offloaded AdamW, DeepSpeed-style.

    engine, optimizer, _, lr_scheduler = heavylift.initialize(model=model, config=cfg)
    for batch in loader:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()          # steps the optimizer at each accumulation boundary
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from heavylift.config.errors import ConfigError, HeavyliftError
from heavylift.config.schema import EngineConfig, validate
from heavylift.cuda_allocator import allocator_note
from heavylift.dist.env import DistEnv, init_dist
from heavylift.engine_placement import InitPlacement
from heavylift.models.compute_dtype import cpu_bf16_slowdown, resolve_dtype
from heavylift.models.loss import chunked_causal_lm_loss
from heavylift.offload.buckets import ParamSpec, plan_buckets, split_tail
from heavylift.offload.nvme_ring import NvmeRing
from heavylift.offload.pipeline import OffloadPipeline, StepResult
from heavylift.offload.placement import AutoPlacement
from heavylift.offload.store import BucketState, Slot, allocate_bucket, local_of, migrate_to_tail, write_master
from heavylift.optim.adamw import AdamWHyper
from heavylift.optim import grad_slot
from heavylift.optim.formats import FORMATS, master_fp32
from heavylift.optim.loss_scale import LossScaler
from heavylift.optim.optimizer import OffloadedAdamW
from heavylift.optim.schedule import build_scheduler
from heavylift.optim.stochastic import stream_key
from heavylift.shard.compile import compile_blocks
from heavylift.shard.compile import wanted as compile_wanted
from heavylift.shard.fsdp import apply_fsdp, find_blocks
from heavylift.shard.gather import gather_full
from heavylift.shard.layout import first_element, local_shape
from heavylift.shard.recompute import checkpointed, set_checkpointed
from heavylift.shard.selective import checkpoint_kwargs, dropout_in
from heavylift.shard.values import (MaterializedValues, MetaInitValues, SafetensorsValues, init_buffers,
                                    is_meta)

log = logging.getLogger("heavylift")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def initialize(model: nn.Module, config: EngineConfig | dict | str | None = None, weights: str | None = None,
               seq_len: int | None = None, **_ignored: Any):
    """Shard ``model`` and build the engine; returns ``(engine, optimizer, None, lr_scheduler)`` like
    ``deepspeed.initialize``.

    The initial fp32 master weights come from ``weights`` (a safetensors checkpoint directory, read
    shard by shard) if given, else from the model's values on the CPU, else (a ``meta`` model) from its
    own initialiser, one unit at a time. ``config`` is an :class:`EngineConfig` or a DeepSpeed config
    (dict or JSON path). ``seq_len`` (tokens per sequence), when given, lets a CUDA run with offload.ratio
    unset place at init the GPU tail the planner predicts will fit.
    """
    cfg = _coerce_config(config)
    engine = Engine(model, cfg, weights, seq_len=seq_len)
    return engine, engine.optimizer, None, engine.lr_scheduler


def _coerce_config(config: EngineConfig | dict | str | None) -> EngineConfig:
    if config is None:
        return validate(EngineConfig())
    if isinstance(config, EngineConfig):
        return validate(config)
    from heavylift.config.deepspeed import from_deepspeed

    # The batch keys are per world: before the engine joins the group (a script's first initialize under
    # torchrun), the group's size is torchrun's WORLD_SIZE, as `heavylift train` reads it, not 1.
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    cfg, notes = from_deepspeed(config, world_size=world)
    for note in notes:
        log.info("deepspeed config: %s", note)
    return cfg


def auto_cpu_threads() -> int:
    """Optimizer threads for this rank: its bound physical cores (heavylift.dist.cores) less one more
    for the copy launches (measured on the H100 box: 14 threads beat 16 under load); unbound, its share
    of the allowed cores less two."""
    from heavylift.dist.cores import current_plan

    plan = current_plan()
    if plan is not None and plan.how != "unbound":
        return max(plan.worker_threads - 1, 1)
    cores = len(os.sched_getaffinity(0))
    per_rank = cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(per_rank - 2, 1)


def _is_no_decay(name: str, p: torch.Tensor, patterns: tuple[str, ...]) -> bool:
    return p.dim() < 2 or any(pat in name for pat in patterns)


class Engine(InitPlacement):
    """Owns the sharded model, the state store, the pipeline and the step counters of one rank."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, weights: str | None = None, seq_len: int | None = None):
        self.env: DistEnv = init_dist()
        self.device = self.env.device
        cfg = self._resolve_dtype(cfg)
        self.config = cfg
        self._cap_gpu_memory()
        self.state_format = FORMATS[cfg.offload.state_format]
        self.grad_slot = grad_slot.resolve(cfg.offload.grad_slot, cfg.offload.state_format, cfg.precision.dtype)
        self.dtype = _DTYPES[cfg.precision.dtype]
        if cfg.offload.accumulate == "host" and (why := grad_slot.host_sums_refused(self.grad_slot, cfg.precision.dtype)):
            raise HeavyliftError(why)
        self.scaler = LossScaler.from_config(cfg.precision)
        self.micro_step = 0
        self.global_step = 0
        self.skipped_steps = 0
        self.last_step: StepResult | None = None

        blocks = find_blocks(model)
        if cfg.save_attention and (why := dropout_in(model)):
            raise HeavyliftError(f"engine.save_attention: the model trains with dropout ({why}); a recompute that "
                                 "skips the attention kernel would draw other random numbers than its forward. "
                                 "Set engine.save_attention false, or the dropout to 0.")
        if cfg.activation_checkpointing:
            kwargs = checkpoint_kwargs(cfg.save_attention)
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            elif hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if hasattr(model, "config"):
                model.config.use_cache = False
        if cfg.loss_chunk_tokens and isinstance(getattr(type(model), "loss_function", None), property):
            model.loss_function = chunked_causal_lm_loss(cfg.loss_chunk_tokens)  # transformers' public setter
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        unit_of = {}
        for u, block in enumerate(blocks):
            for p in block.parameters():
                unit_of[id(p)] = u
        root_unit = len(blocks)
        o = cfg.optim
        self._group_of_name = {n: int(_is_no_decay(n, p, o.no_decay)) for n, p in named}
        rank, world = self.env.rank, self.env.world_size
        units: list[list[ParamSpec]] = [[] for _ in range(root_unit + 1)]
        shapes: dict[str, torch.Size] = {}
        self.rounding_seed = cfg.seed  # of a stochastically rounded master's random bits (a checkpoint's wins)
        stream_of: dict[str, tuple[int, int]] = {}  # per parameter: (stream key, global index of the shard's start)
        for n, p in named:
            shapes[n] = local_shape(p.shape, rank, world)
            stream_of[n] = (stream_key(cfg.seed, n), first_element(p.shape, rank, world))
            units[unit_of.get(id(p), root_unit)].append(ParamSpec(n, shapes[n].numel(), self._group_of_name[n]))
        specs = plan_buckets(units, cfg.offload.bucket_params)
        if cfg.offload.ratio is not None:
            first_tail = split_tail(specs, cfg.offload.ratio)
        else:
            first_tail = self._auto_first_tail(specs, model, seq_len)
        fmt = self.state_format
        compact = fmt.name != "fp32"
        if compact and cfg.offload.kernel == "torch":
            raise ConfigError("offload.kernel", "torch", f"auto or native (state_format "
                              f"{cfg.offload.state_format!r} is stepped by heavylift's native kernel)")
        native = self._native_kernel(required=compact) if cfg.offload.kernel != "torch" else None
        first_ram = self._nvme_split(specs[:first_tail])
        speculate, assist = self._preflight(specs[first_ram:first_tail], double_buffer=native is not None,
                                            nvme_specs=specs[:first_ram])

        # Host state first, from the caller's values (or drawn unit by unit for a meta model); then
        # cast and shard the model. NVMe buckets come first in arrival order: their file (and its path
        # checks) exists before any RAM state is allocated.
        meta = is_meta(model)
        if weights is not None:
            values = SafetensorsValues(weights, rank, world)
        elif meta:
            values = MetaInitValues(model, rank, world, cfg.seed, blocks)
        else:
            values = MaterializedValues(model, rank, world)
        self.buckets: list[BucketState] = []
        self.ring: NvmeRing | None = None
        for spec in specs:
            nvme = spec.index < first_ram
            bucket = allocate_bucket(spec, [shapes[p.name] for p in spec.params], self.device,
                                     pin=cfg.offload.pin_memory and torch.cuda.is_available(),
                                     snapshot=speculate and native is None and not nvme,
                                     tail=spec.index >= first_tail,
                                     double_buffer=speculate and native is not None and not nvme, fmt=fmt,
                                     pin_all=assist,
                                     grad_dtype=grad_slot.GRAD_SLOTS[self.grad_slot], nvme=nvme)
            for slot in bucket.slots:
                slot.sr = stream_of[slot.spec.name]
            self.buckets.append(bucket)
            if nvme and spec.index == first_ram - 1:
                self.ring = NvmeRing(self.buckets, cfg.offload.nvme_path, rank, cfg.offload.nvme_buffers,
                                     pin=cfg.offload.pin_memory)
        for bucket in self.resident_buckets(write=True, fresh=True):
            with torch.no_grad():
                for slot in bucket.slots:
                    write_master(slot, values.shard(slot.spec.name).reshape(slot.grad.shape))
        values.close()
        model.to(dtype=self.dtype)
        apply_fsdp(model, blocks, self.env.mesh, reduce_dtype=torch.float32)
        if compile_wanted(cfg.compile, self.device):
            compile_blocks(blocks)
        if meta:
            model.to_empty(device=self.device)
            init_buffers(model, self.device)
        self.module = model

        sharded = dict(model.named_parameters())
        slot_of: dict[int, Slot] = {}
        params_of: dict[int, tuple[int, int]] = {}
        for b, bucket in enumerate(self.resident_buckets()):
            for i, slot in enumerate(bucket.slots):
                p = sharded[slot.spec.name]
                if local_of(p).shape != slot.grad.shape:
                    raise AssertionError(f"shard layout mismatch for {slot.spec.name}: FSDP2 "
                                         f"{tuple(local_of(p).shape)} vs planned {tuple(slot.grad.shape)}")
                slot.device_param = p
                # the forward must see the master: a bf16 master is the fp32 values rounded (and stays so)
                if meta or weights is not None or fmt.master_dtype != torch.float32:
                    with torch.no_grad():
                        local_of(p).copy_(slot.master)
                slot_of[id(p)] = slot
                params_of[id(p)] = (b, i)
        groups = [
            {"params": [sharded[n] for n, _ in named if self._group_of_name[n] == g], "lr": o.lr,
             "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay if g == 0 else 0.0}
            for g in (0, 1)
        ]
        self._group_index = [g for g in (0, 1) if groups[g]["params"]]
        groups = [groups[g] for g in self._group_index]
        self.pipeline = OffloadPipeline(
            self.buckets, params_of, self._slot_group, self._hyper, self.device,
            dist.group.WORLD, speculate, cfg.offload.cpu_threads or auto_cpu_threads(), native=native,
            ring=self.ring, gpu_assist=0.0 if cfg.offload.gpu_assist == "auto" else cfg.offload.gpu_assist,
            assist=assist,  # auto: the placement sets the share
            host_accumulate=cfg.offload.accumulate == "host",
        )
        self.optimizer = OffloadedAdamW(groups, slot_of, self._optimizer_step, settle=lambda: self.pipeline.wait_all())
        self.lr_scheduler = build_scheduler(self.optimizer, cfg.schedule)
        # Kept to be removed at close: a tensor's post-accumulate-grad hooks are held from C++, where Python's
        # collector cannot see the cycle parameter -> hook -> pipeline -> engine -> model -> parameter, so a
        # closed engine (its weights and GPU-tail state) would otherwise live as long as the process.
        self._hooks = [slot.device_param.register_post_accumulate_grad_hook(self.pipeline.on_grad)
                       for bucket in self.buckets for slot in bucket.slots]
        unit_buckets: dict[int, list[int]] = {}
        for b in self.buckets:
            unit_buckets.setdefault(b.spec.unit, []).append(b.spec.index)
        for u, module in enumerate([*blocks, model]):
            idx = unit_buckets.get(u, [])
            self._hooks.append(module.register_forward_pre_hook(
                lambda _m, _a, idx=idx: self.pipeline.wait_buckets(idx), prepend=True))
        self.first_tail = first_tail
        self.first_ram = first_ram
        self.blocks = blocks
        if self.env.is_main:
            log.info("offload: %s", grad_slot.why(cfg.offload.grad_slot, cfg.offload.state_format, cfg.precision.dtype))
            log.info("optimizer state: %s", self.describe_placement())
            if self.device.type == "cuda":
                log.info("%s", allocator_note())
        self.placement = None
        if self.device.type == "cuda":
            self.placement = AutoPlacement(self, blocks, tail=cfg.offload.ratio is None,
                                           recompute=cfg.activation_checkpointing and cfg.recompute == "auto")

    def _resolve_dtype(self, cfg: EngineConfig) -> EngineConfig:
        """``precision.dtype: auto`` made concrete (models/compute_dtype.py), alike on every rank: fp32 if any
        rank's CPU lacks native bf16. The caller's config is not changed."""
        if cfg.precision.dtype != "auto":
            return cfg
        bf16 = self._min_over_ranks(int(resolve_dtype("auto", self.device.type == "cuda") == "bf16"),
                                    "precision.dtype auto all-reduce")
        if self.env.is_main:
            log.info("precision.dtype auto: %s", "bf16" if bf16 else
                     f"fp32 (this CPU's bf16 matmul is {cpu_bf16_slowdown():.0f}x slower than its fp32 one)")
        return dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype="bf16" if bf16 else "fp32"))

    def _native_kernel(self, required: bool = False):
        from heavylift.optim import native

        module = native.load()
        if module is None and (self.config.offload.kernel == "native" or required):
            raise HeavyliftError(f"offload.kernel 'native' could not be built ({native.failure()}): install a C++ "
                                 "compiler and ninja, or set offload.kernel: torch")
        return module

    def describe_placement(self) -> str:
        """The startup plan's line: where each bucket's optimizer state lives."""
        def params(bs) -> str:
            return f"{sum(b.spec.numel for b in bs) / 1e6:.1f} M params"

        ram, tail = self.buckets[self.first_ram:self.first_tail], self.buckets[self.first_tail:]
        out = f"{len(tail)} bucket(s) on the GPU ({params(tail)}), {len(ram)} in RAM ({params(ram)})"
        if self.ring is not None:
            nvme = self.buckets[:self.first_ram]
            out += (f", {len(nvme)} on NVMe ({params(nvme)}, {self.ring.file.size / 2**30:.2f} GiB in "
                    f"{self.ring.file.path}, ring of {len(self.ring._sets)} buffer sets = "
                    f"{self.ring.nbytes() / 2**30:.2f} GiB)")
        return out

    def resident_buckets(self, write: bool = False, fresh: bool = False):
        """Every bucket in turn with its state bound: NVMe buckets are made resident one at a time (written
        back after if ``write``; ``fresh``: zeroed, not read). The caller must not keep views past its turn."""
        for bucket in self.buckets:
            if bucket.nvme:
                self.ring.hold(bucket.spec.index, dirty=write, fresh=fresh)
            yield bucket
        if self.ring is not None:
            self.ring.let_go()

    # ---- hyper-parameters as the scheduler left them ------------------------------------------------
    def _slot_group(self, slot: Slot) -> int:
        return self._group_index.index(slot.spec.group)

    def _hyper(self, g: int) -> AdamWHyper:
        group = self.optimizer.param_groups[g]
        b1, b2 = group["betas"]
        return AdamWHyper(lr=float(group["lr"]), beta1=b1, beta2=b2, eps=group["eps"],
                          weight_decay=group["weight_decay"])

    # ---- DeepSpeed-shaped training API --------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if self.placement is not None:
            self.placement.forward_started()
        return self.module(*args, **kwargs)

    forward = __call__

    def train(self, mode: bool = True) -> "Engine":
        self.module.train(mode)
        return self

    def eval(self) -> "Engine":
        return self.train(False)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.batch.grad_accum

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_step + 1) % self.gradient_accumulation_steps == 0

    def backward(self, loss: torch.Tensor) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        if boundary:
            self.pipeline.begin_boundary_backward(inv_scale=1.0 / self.scaler.scale)
        self.pipeline.boundary = boundary
        self.pipeline.in_backward = True
        if self.placement is not None:
            self.placement.backward_started()
        try:
            (loss * (self.scaler.scale / self.gradient_accumulation_steps)).backward()
        finally:
            self.pipeline.in_backward = False
        self.pipeline.end_backward()

    def step(self) -> None:
        """Count a micro-step; at an accumulation boundary, validate and finish the optimizer step."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_step += 1
        if boundary:
            self.optimizer.step()

    def _optimizer_step(self) -> StepResult:
        result = self.pipeline.finish_step(self.config.optim.max_grad_norm)
        self.scaler.update(result.skipped)
        self.global_step += 1
        if result.skipped:
            self.skipped_steps += 1
        else:
            self.lr_scheduler.step()
        self.last_step = result
        if self.placement is not None:
            self.placement.after_step(result.skipped)
        return result

    def grow_tail(self, n: int) -> None:
        """Move the ``n`` last-arriving host buckets to the GPU tail (state copied exactly)."""
        n = min(n, self.first_tail - self.first_ram)  # NVMe buckets stay where they are
        if n <= 0:
            return
        self.pipeline.wait_all()
        new_first = self.first_tail - n
        for b in range(new_first, self.first_tail):
            moved = migrate_to_tail(self.buckets[b], self.device)
            self.buckets[b].release()
            self.buckets[b] = moved  # the pipeline shares this list
            for slot in moved.slots:
                self.optimizer._slots[id(slot.device_param)] = slot
        self.optimizer.sync_state()
        log.info("GPU tail grown to %d of %d buckets", len(self.buckets) - new_first,
                 len(self.buckets))
        self.first_tail = new_first

    # ---- placement, as checkpoints record it ----------------------------------------------------------
    def reseed_rounding(self, seed: int) -> None:
        """Draw a stochastically rounded master's random bits from ``seed`` (a resumed run: the saved one)."""
        self.rounding_seed = seed
        for bucket in self.buckets:
            for slot in bucket.slots:
                slot.sr = (stream_key(seed, slot.spec.name), slot.sr[1])

    def placement_state(self) -> dict:
        """Where the steps put things: how many buckets step on the GPU, which blocks recompute. A resume
        must continue with the same (the GPU tail and the CPU kernel round differently)."""
        return {"tail_buckets": len(self.buckets) - self.first_tail,
                "recomputing": [checkpointed(b) for b in self.blocks], "gpu_assist": self.pipeline.gpu_assist}

    def settle_placement(self) -> None:
        """Stop adapting the placement (a checkpoint is being taken: a run resumed from it cannot replay
        the measurements that would move it later)."""
        if self.placement is not None:
            self.placement.settle()

    def restore_placement(self, state: dict | None) -> None:
        """Apply a checkpoint's placement (same rank count) and stop adapting: the resumed run steps
        exactly as the saved one did."""
        if not state:
            return
        self.grow_tail(state["tail_buckets"] - (len(self.buckets) - self.first_tail))
        if self.config.activation_checkpointing and len(state["recomputing"]) == len(self.blocks):
            for block, on in zip(self.blocks, state["recomputing"]):
                set_checkpointed(block, on)
        if self.config.offload.gpu_assist == "auto" and self.pipeline.assisting:  # the share auto chose
            self.pipeline.gpu_assist = state.get("gpu_assist", 0.0)
        if self.placement is not None:
            self.placement.settle()

    # ---- reading the fp32 master weights --------------------------------------------------------------
    @torch.no_grad()
    def master_weights(self) -> dict[str, torch.Tensor]:
        """Every parameter's full fp32 master weight by name (gathered from all ranks, on CPU); a bf16
        master with its compensation added."""
        self.pipeline.wait_all()
        return {slot.spec.name: gather_full(master_fp32(slot.state), slot.device_param.shape, self.device,
                                            "master-weights all-gather")
                for bucket in self.resident_buckets() for slot in bucket.slots}

    # ---- checkpoints (DeepSpeed names) ------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, client_state=None, keep: int = 0, tokenizer=None):
        """Atomic, verified, sharded checkpoint of everything (heavylift/checkpoint)."""
        from heavylift.checkpoint import save

        return save(self, save_dir, tag or f"global_step{self.global_step}", extra=client_state, keep=keep,
                    tokenizer=tokenizer)

    def load_checkpoint(self, load_dir, tag=None):
        """Returns ``(path, client_state)`` like DeepSpeed; checksums are verified before anything loads."""
        from heavylift.checkpoint import load

        extra = load(self, load_dir, tag or "latest")
        return os.path.join(str(load_dir), extra["tag"]), extra

    def close(self) -> None:
        self.pipeline.wait_all()
        self.pipeline.close()
        for h in self._hooks:  # the model may outlive the engine: it must no longer call into it
            h.remove()
        self._hooks = []
        if torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
        for bucket in self.buckets:
            bucket.release()
        if self.ring is not None:
            self.ring.close()
