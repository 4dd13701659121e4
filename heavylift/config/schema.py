"""The one typed configuration tree.

Every user-facing setting lives here, as a field of a frozen-shape dataclass. Loaders (YAML/TOML files,
dotted command-line overrides, DeepSpeed JSON) only produce these objects; ``validate`` checks them once,
before any process group or allocation, and raises :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from heavylift.config.errors import ConfigError

Dtype = Literal["auto", "bf16", "fp16", "fp32"]
StateFormatName = Literal["fp32", "bf16-moments", "int8-moments", "bf16-master", "bf16-master-int8"]
STATE_FORMATS = ("fp32", "bf16-moments", "int8-moments", "bf16-master", "bf16-master-int8")  # optim/formats.py defines each
ScheduleKind = Literal["constant", "warmup", "warmup_cosine", "warmup_linear"]


@dataclass
class OptimConfig:
    """AdamW hyper-parameters (decoupled weight decay, as ``torch.optim.AdamW``)."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Global L2 gradient-norm clip; 0 disables clipping.
    max_grad_norm: float = 1.0
    # Parameters whose name matches one of these substrings, and every 1-D parameter (norms, biases),
    # get no weight decay.
    no_decay: tuple[str, ...] = ("bias", "norm")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, as a multiplier of ``optim.lr`` per optimizer step."""

    kind: ScheduleKind = "constant"
    warmup_steps: int = 0
    # Needed by the decaying schedules; the trainer fills it from ``train.max_steps`` when left at 0.
    total_steps: int = 0
    # Multiplier at the start of warm-up and at the end of decay.
    warmup_start_ratio: float = 0.0
    min_ratio: float = 0.0


@dataclass
class PrecisionConfig:
    """Compute dtype of the GPU copy of the weights; fp16 adds dynamic loss scaling. "auto" (heavylift
    train's default): bf16 on a GPU and on a CPU with native bf16 matmuls, fp32 on other CPUs
    (models/compute_dtype.py)."""

    dtype: Dtype = "bf16"
    # fp16 only. 0 means dynamic scaling starting at 2**initial_scale_power.
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0


@dataclass
class OffloadConfig:
    """Where the optimizer state lives and how its CPU step is overlapped."""

    # Where the host-side optimizer state lives: "cpu" (RAM) or "nvme" (as much in RAM as fits, the rest
    # in a preallocated file per rank under ``nvme_path``, streamed through a ring of pinned buffers).
    device: Literal["cpu", "nvme"] = "cpu"
    # device nvme: an existing, writable directory on a local NVMe drive (one file per rank is created).
    nvme_path: str = ""
    # device nvme: fraction of the host buckets' parameters (the earliest-arriving buckets, stepped last)
    # whose state lives on NVMe. None: as much in RAM as MemAvailable allows, the rest on NVMe.
    nvme_ratio: float | None = None
    # device nvme: buffer sets in the ring (one stepped, the rest read ahead or written behind).
    nvme_buffers: int = 3
    pin_memory: bool = True
    # Fraction of buckets (in gradient-arrival order) stepped on the CPU; the rest (the buckets whose
    # gradients arrive last) keep their optimizer state on the GPU. None: chosen automatically.
    ratio: float | None = None
    # Share (by parameters, 0-1) of the RAM buckets the GPU steps in a step that did not speculate (it
    # clipped last time, or speculation is off): their state goes up the link, is stepped with the GPU
    # tail's arithmetic and comes back, while the CPU steps the rest (offload/assist.py). 0: off. Formats:
    # fp32, int8-moments, bf16-master. "auto" (the default): on a CUDA device with one of those formats, the
    # share that balances the CPU's rate against the link's, both measured after the first steps
    # (offload/assist_share.py); off elsewhere, and off where `ulimit -l` cannot pin every host state
    # buffer, which the assist needs (a share > 0 refuses to start there instead).
    gpu_assist: float | Literal["auto"] = "auto"
    # Optimizer threads per rank; 0 means chosen from the cores this rank may use.
    cpu_threads: int = 0
    # Step CPU buckets during backward, before the global norm is known (exactly undone or redone if
    # clipping triggers or a gradient is not finite). Off: CPU buckets step after backward.
    speculate: bool = True
    # CPU AdamW kernel. "native": heavylift's out-of-place kernel (compiled on first use), so a
    # speculative step writes a second buffer set instead of copying a snapshot (28 instead of 52
    # bytes/param of traffic); equal to torch's to fp32 rounding. "torch": torch's fused kernel
    # (bitwise torch.optim.AdamW(fused=True)). "auto": native when it compiles, else torch.
    kernel: Literal["auto", "native", "torch"] = "auto"
    # How optimizer state is stored (host bytes/param with the gradient slot). "fp32": fp32 master and
    # moments, exact AdamW (16). The others are opt-in, not exact; docs/state-formats.md has their
    # measured error. "bf16-moments": moments rounded to bfloat16 (12). "int8-moments": m and sqrt(v)
    # block-quantized to 8 bits, one fp32 scale per 256 (~10). "bf16-master": bf16 master with a bf16
    # Kahan compensation and bf16 moments (12; uploads 2 instead of 4 bytes/param, no cast).
    # "bf16-master-int8": bf16 master stochastically rounded (no compensation), moments as int8-moments
    # (~6 with the bf16 slot; the smallest; uploads 2 bytes/param, no cast).
    state_format: StateFormatName = "fp32"
    # dtype of the pinned host slot each host bucket's gradient waits in until the step is validated.
    # "auto": bf16 with bf16 compute (FSDP2 hands over bf16 gradients: nothing is lost) and with the
    # compact formats; fp32 otherwise. "bf16" with fp32/fp16 compute rounds the gradient to bf16
    # (docs/state-formats.md). Saves 2 host bytes/param and halves the gradient's link traffic.
    grad_slot: Literal["auto", "fp32", "bf16"] = "auto"
    # Where gradient accumulation (batch.grad_accum > 1) sums a host bucket's micro-batch gradients.
    # "device": FSDP2 sums them in the sharded .grad on the card (2 B/param with bf16 compute, held all
    # window). "host": each micro-batch's reduced gradient goes to the host slot as it lands and the card
    # lets it go; from the second micro-batch on, the slot's partial sum goes up, the GPU adds the new
    # gradient (FSDP2's addition, in the same dtype and order: training is bitwise that of "device") and
    # the sum comes back. Costs link traffic each micro-batch (idle then). GPU-tail buckets keep summing on
    # the card. Needs the slot in the compute dtype (grad_slot auto with bf16 compute, or fp32 with fp32).
    accumulate: Literal["device", "host"] = "device"
    # Target bucket size in parameters (buckets never split a parameter and never span two FSDP units).
    bucket_params: int = 200_000_000


@dataclass
class BatchConfig:
    micro_batch_size: int = 1
    grad_accum: int = 1


@dataclass
class EngineConfig:
    """What :func:`heavylift.initialize` needs: optimizer, schedule, precision, offload, batching."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    activation_checkpointing: bool = True
    # With activation checkpointing on a GPU: "auto" lets blocks stop recomputing once the first steps
    # have measured the memory they would keep (heavylift/offload/placement.py); "all" recomputes every block.
    recompute: str = "auto"
    # With activation checkpointing: a recomputing block keeps its attention kernel's output and log-sum-exp
    # and reruns only the rest in backward (heavylift/shard/selective.py). Costs 2 B x heads x head_dim per
    # token and block on the GPU.
    save_attention: bool = False
    # torch.compile each decoder block's norms, attention and MLP (heavylift/shard/compile.py): "auto" on
    # CUDA only, "on", "off".
    compile: str = "auto"
    # The causal-LM loss in chunks of this many tokens, never holding fp32 logits for the whole batch
    # (heavylift/models/loss.py); 0 keeps the model's own loss.
    loss_chunk_tokens: int = 8192
    # The most GPU memory (GiB) this process may use on its card; None: the whole card. The allocator refuses
    # beyond it (torch.cuda.set_per_process_memory_fraction), and the preflight, the GPU tail and the kept
    # blocks plan against it: room left for another process, or a smaller card's plan on a larger one.
    gpu_memory_gib: float | None = None
    # Random initial weights of a model given on the meta device (heavylift train's presets): each FSDP unit
    # is drawn by the model's own initialiser from a seed made of this and the unit's name, so the values do
    # not depend on the world size (they are not those of the same model built eagerly with this seed).
    seed: int = 0


def validate(cfg: EngineConfig) -> EngineConfig:
    """Check every field once; raise :class:`ConfigError` naming the dotted key and what is allowed."""
    o = cfg.optim
    _check(o.lr >= 0, "optim.lr", o.lr, "a number >= 0")
    _check(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", o.betas,
           "two numbers in [0, 1)")
    _check(o.eps > 0, "optim.eps", o.eps, "a number > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    _check(o.max_grad_norm >= 0, "optim.max_grad_norm", o.max_grad_norm, "a number >= 0 (0 disables)")
    s = cfg.schedule
    _check(s.kind in ("constant", "warmup", "warmup_cosine", "warmup_linear"), "schedule.kind", s.kind,
           "constant, warmup, warmup_cosine or warmup_linear")
    _check(s.warmup_steps >= 0, "schedule.warmup_steps", s.warmup_steps, "an integer >= 0")
    _check(s.total_steps >= 0, "schedule.total_steps", s.total_steps, "an integer >= 0")
    _check(0 <= s.warmup_start_ratio <= 1, "schedule.warmup_start_ratio", s.warmup_start_ratio, "[0, 1]")
    _check(0 <= s.min_ratio <= 1, "schedule.min_ratio", s.min_ratio, "[0, 1]")
    p = cfg.precision
    _check(p.dtype in ("auto", "bf16", "fp16", "fp32"), "precision.dtype", p.dtype, "auto, bf16, fp16 or fp32")
    _check(p.loss_scale >= 0, "precision.loss_scale", p.loss_scale, "0 (dynamic) or a number > 0")
    _check(p.loss_scale_window >= 1, "precision.loss_scale_window", p.loss_scale_window, "an integer >= 1")
    _check(p.min_loss_scale > 0, "precision.min_loss_scale", p.min_loss_scale, "a number > 0")
    _check(p.hysteresis >= 1, "precision.hysteresis", p.hysteresis, "an integer >= 1")
    f = cfg.offload
    _check(f.device in ("cpu", "nvme"), "offload.device", f.device, "cpu or nvme")
    _check(f.device == "cpu" or bool(f.nvme_path), "offload.nvme_path", f.nvme_path,
           "a directory on a local NVMe drive (offload.device is nvme)")
    _check(f.nvme_ratio is None or 0.0 <= f.nvme_ratio <= 1.0, "offload.nvme_ratio", f.nvme_ratio,
           "null (auto: as much state in RAM as fits) or [0, 1]")
    _check(f.nvme_ratio is None or f.device == "nvme", "offload.nvme_ratio", f.nvme_ratio,
           "null unless offload.device is nvme")
    _check(f.nvme_buffers >= 1, "offload.nvme_buffers", f.nvme_buffers, "an integer >= 1 (3 or 4 is typical)")
    _check(f.ratio is None or 0.0 <= f.ratio <= 1.0, "offload.ratio", f.ratio, "null (auto) or [0, 1]")
    _check(f.gpu_assist == "auto" or 0.0 <= f.gpu_assist <= 1.0, "offload.gpu_assist", f.gpu_assist,
           "a fraction in [0, 1] (0: off) or auto")
    from heavylift.optim.formats import SELF_TAILED

    _check(f.gpu_assist in (0.0, "auto") or f.state_format in SELF_TAILED, "offload.gpu_assist", f.gpu_assist,
           f"0 or auto with state_format {f.state_format!r} (the GPU steps {', '.join(SELF_TAILED)})")
    _check(f.cpu_threads >= 0, "offload.cpu_threads", f.cpu_threads, "0 (auto) or an integer >= 1")
    _check(f.kernel in ("auto", "native", "torch"), "offload.kernel", f.kernel, "auto, native or torch")
    _check(f.state_format in STATE_FORMATS, "offload.state_format", f.state_format,
           f"{', '.join(STATE_FORMATS[:-1])} or {STATE_FORMATS[-1]}")
    _check(f.grad_slot in ("auto", "fp32", "bf16"), "offload.grad_slot", f.grad_slot, "auto, fp32 or bf16")
    _check(f.accumulate in ("device", "host"), "offload.accumulate", f.accumulate, "device or host")
    _check(f.bucket_params >= 1, "offload.bucket_params", f.bucket_params, "an integer >= 1")
    _check(cfg.recompute in ("auto", "all"), "recompute", cfg.recompute, "auto or all")
    _check(cfg.compile in ("auto", "on", "off"), "compile", cfg.compile, "auto, on or off")
    _check(cfg.activation_checkpointing or not cfg.save_attention, "save_attention", cfg.save_attention,
           "false while activation_checkpointing is off (no block recomputes, so there is nothing to keep)")
    _check(cfg.loss_chunk_tokens >= 0, "loss_chunk_tokens", cfg.loss_chunk_tokens, "0 (off) or an integer >= 1")
    b = cfg.batch
    _check(cfg.gpu_memory_gib is None or cfg.gpu_memory_gib > 0, "gpu_memory_gib", cfg.gpu_memory_gib,
           "null (the whole card) or a number of GiB > 0")
    _check(b.micro_batch_size >= 1, "batch.micro_batch_size", b.micro_batch_size, "an integer >= 1")
    _check(b.grad_accum >= 1, "batch.grad_accum", b.grad_accum, "an integer >= 1")
    return cfg


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def share_or_auto(text: str) -> float | str:
    """A command line's offload.gpu_assist: "auto" or a number (validate checks its range)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"a share in [0, 1] or auto, not {text!r}") from None


def assist_wanted(offload: OffloadConfig, cuda: bool) -> bool:
    """Whether the GPU assist runs (its thread, every host state buffer pinned): a share > 0, or "auto" on a
    CUDA device with a state format the GPU steps itself."""
    from heavylift.optim.formats import SELF_TAILED

    if offload.gpu_assist == "auto":
        return cuda and offload.state_format in SELF_TAILED
    return offload.gpu_assist > 0
