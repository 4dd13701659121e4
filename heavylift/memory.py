"""The memory and step-time planner behind ``heavylift estimate`` and the ``train`` preflight.

Pure arithmetic: nothing here allocates a tensor on a real device (the model shape is read from a
``meta``-device model, which holds no storage). Every figure is per rank unless it says "node".

GPU, per rank (bf16 compute dtype, 2 B/param; fp32 4 B):
- weights: the FSDP2 shards, 2 P / world.
- GPU-tail state: 16 B/param (fp32 master, exp_avg, exp_avg_sq, gradient slot) for the tail buckets,
  chosen exactly as the engine does (whole buckets, last-arriving first; auto = the root unit if its
  state fits a tenth of the card; after the first step the engine grows the tail into the measured
  headroom, which this plan does not count as required).
- the peak is the larger of two phases of one micro-step:
  * loss phase: the root unit gathered (embeddings/head, bf16), every checkpointed block input
    (layers x tokens x hidden x 2 B with activation checkpointing; every block's activations without),
    the final norm, and the loss: in backward, cross-entropy holds three fp32 [tokens, vocab] tensors at
    once (the saved log-softmax, the nll gradient, the log-softmax gradient: 12 B/token/vocab; HF upcasts
    the logits to fp32 before the loss).
  * block phase: the root unit's gathered weights and unsharded gradient (kept until its reduce-scatter,
    last), block inputs, one block recomputed with its backward working set, the gathered block
    (bf16 weights, the prefetched next block, its bf16 gradient and the fp32 reduce-scatter input),
    and the fp32 staging of one bucket each way (non-blocking dtype-converting copies convert on the GPU).
  Calibrated on qwen3-4b's shape (Llama, head_dim 80: 3.67 B params), seq 4096, micro-batch 4, AC, 1 GPU:
  measured 44.42 GiB (root unit in the tail) and 64.81 GiB (offload.ratio 0.5); see tests/unit/test_memory.py.

Host, per rank: pinned master + gradient slot (8 B/param, exact: the store page-locks its own buffers
instead of using PyTorch's pinned caching allocator, which rounds each block up to a power of two), pageable moments (8 B/param), the speculation snapshot (12 B/param,
dropped by the engine when it does not fit), the model as loaded (full, on every rank, until sharded) and
a fixed runtime overhead (CUDA/torch libraries). NVMe: 0 (no NVMe tier yet).

Step-time floor (hardware.md's model), per optimizer step, T = tokens per step over all ranks:
- T_gpu  = k P T / (N F), k = 8 with activation recompute, 6 without; F = bf16 matmul rate per GPU.
- T_cpu  = P_host_node / R; R = fused CPU AdamW rate of the whole host in params/s (28 B/param of memory
  traffic per parameter: M = 28 R); the ranks of a node share it.
- T_link = link traffic per rank / bandwidth. In the current engine a host-stepped parameter costs 4 B
  down (the bf16 gradient is converted to fp32 on the GPU, then copied into the pinned fp32 slot) and
  4 B up (the fp32 master is copied up and converted to bf16 on the GPU): 8 B/param of host shard per
  step. The two directions run on separate streams at once; the H100 box moves 84.8 GB/s both ways
  together against 55 GB/s one way, so T_link = 8 P_host_rank / (DUPLEX x W), DUPLEX = 1.55.
- floor = max of the three (they overlap); the serial sum is what an offload that does not overlap pays.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import resource
import time
from dataclasses import dataclass, field

from heavylift.config.errors import HeavyliftError

GiB = 1024**3
STATE_FORMATS = {"fp32": 16, "bf16-moments": 12}  # host bytes/param incl. gradient slot; pinned: 8 (master + grad)
SNAPSHOT_BYTES = 12
TAIL_BYTES = 16
PINNED_BYTES = 8
GPU_UNCERTAINTY = 0.10  # calibrated within ~2% on two points; 10% margin for shapes not measured
HOST_UNCERTAINTY = 0.10
CUDA_CONTEXT_BYTES = int(0.6 * GiB)  # outside torch's allocator (not in max_memory_allocated)
HOST_RUNTIME_BYTES = int(2.4 * GiB)  # per rank: torch + CUDA libraries, allocator slack (calibrated)
LINK_DUPLEX = 1.55  # both directions at once / one direction (84.8 / 55 GB/s, hardware.md)
DEFAULT_LINK_GBS = 50.0
DEFAULT_GPU_TFLOPS = 746.0  # H100 bf16 matmul 8192^3 measured (hardware.md), when no GPU can be probed
AUTO_TAIL_CARD_FRACTION = 0.10  # engine._auto_ratio


# ---------------------------------------------------------------------------------------------------
# Model shape
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model: per-parameter shapes per FSDP unit and the dimensions."""

    name: str
    units: tuple[tuple[tuple[int, ...], ...], ...]  # blocks in forward order, then the root unit
    layers: int
    hidden: int
    ffn: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # kv heads x head_dim
    vocab: int
    qk_norm: bool = False

    @property
    def params(self) -> int:
        return sum(math.prod(s) for unit in self.units for s in unit)

    @property
    def root_params(self) -> int:
        return sum(math.prod(s) for s in self.units[-1])

    @property
    def max_block_params(self) -> int:
        return max((sum(math.prod(s) for s in u) for u in self.units[:-1]), default=0)


def _default_model_config():
    """SmolLM2-135M-Instruct (the embedded default model), without reading its GGUF file."""
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                       max_position_embeddings=8192, rms_norm_eps=1e-5)


def resolve_config(spec):
    """A ``PretrainedConfig`` from a preset name, "default", an HF model directory, or a config object."""
    from transformers import PretrainedConfig
    if isinstance(spec, PretrainedConfig):
        return spec
    from heavylift.models.presets import PRESETS, preset_config
    if spec == "default":
        return _default_model_config()
    if spec in PRESETS:
        return preset_config(spec)
    path = pathlib.Path(str(spec))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HeavyliftError(f"model directory {str(path)!r} has no config.json")
        from transformers import AutoConfig
        try:
            return AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise HeavyliftError(f"cannot read {str(path / 'config.json')!r}: {str(e).splitlines()[0]}") from e
    raise HeavyliftError(f"model {spec!r} is neither 'default', a preset ({', '.join(PRESETS)}) "
                         "nor a directory with a config.json")


def model_shape(spec) -> ModelShape:
    """The shape of ``spec`` (see :func:`resolve_config`), from a ``meta``-device model (no storage)."""
    import torch
    from transformers import AutoModelForCausalLM
    config = resolve_config(spec)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise HeavyliftError(f"cannot build a causal LM from the config of {getattr(spec, 'name_or_path', spec)!r}: "
                             f"{str(e).splitlines()[0]}") from e
    return shape_of_model(model, name=str(spec) if isinstance(spec, (str, os.PathLike)) else
                          (config.name_or_path or config.model_type))


def shape_of_model(model, name: str = "") -> ModelShape:
    """The shape of an instantiated model (any device), its FSDP units found as the engine finds them."""
    from heavylift.shard.fsdp import find_blocks
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    blocks = find_blocks(model)
    unit_of = {}
    for u, block in enumerate(blocks):
        for p in block.parameters():
            unit_of[id(p)] = u
    units: list[list[tuple[int, ...]]] = [[] for _ in range(len(blocks) + 1)]
    for _, p in model.named_parameters():
        if p.requires_grad:
            units[unit_of.get(id(p), len(blocks))].append(tuple(p.shape))
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(name=name or type(model).__name__, units=tuple(tuple(u) for u in units),
                      layers=len(blocks), hidden=hidden, ffn=getattr(text, "intermediate_size", 4 * hidden),
                      q_dim=heads * head_dim, kv_dim=kv * head_dim, vocab=text.vocab_size,
                      qk_norm=getattr(text, "model_type", "") in ("qwen3", "qwen3_moe", "olmo2", "gemma3"))


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """The run being planned."""

    gpus_per_node: int = 1
    nodes: int = 1
    seq: int = 4096
    mbs: int = 1
    accum: int = 1
    activation_checkpointing: bool = True
    state_format: str = "fp32"
    speculate: bool = True
    # Fraction of parameters whose optimizer state is on the GPU (= 1 - offload.ratio); None: as the
    # engine chooses it (the root unit if its state fits a tenth of the card, else none).
    tail_ratio: float | None = None
    bucket_params: int = 200_000_000
    dtype_bytes: int = 2  # compute dtype of the GPU weights: 2 for bf16/fp16, 4 for fp32
    pin: bool = True  # pinned transfer buffers (the engine pins when CUDA exists and offload.pin_memory)
    load_bytes: int = 4  # bytes/param of the model each rank holds on the CPU while the engine is built
    # engine.loss_chunk_tokens: 0 is the model's own loss (fp32 logits for the whole batch)
    loss_chunk_tokens: int = 8192

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.mbs * self.accum * self.world


@dataclass(frozen=True)
class Machine:
    """What one node offers. None: unknown (that tier's verdict is "unknown")."""

    gpu_total_bytes: int | None = None
    gpu_free_bytes: int | None = None  # defaults to total less the CUDA context
    host_available_bytes: int | None = None
    memlock_bytes: int | None = None  # ``ulimit -l``; None: unlimited
    has_cuda: bool = False
    gpu_name: str = ""

    @property
    def gpu_usable(self) -> int | None:
        if self.gpu_free_bytes is not None:
            return self.gpu_free_bytes - CUDA_CONTEXT_BYTES
        if self.gpu_total_bytes is not None:
            return self.gpu_total_bytes - CUDA_CONTEXT_BYTES
        return None


@dataclass(frozen=True)
class Rates:
    gpu_tflops: float
    cpu_params_per_s: float  # whole host
    link_gbs: float  # per GPU, one direction
    sources: tuple[str, str, str] = ("given", "given", "given")


# ---------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    shape: ModelShape
    setup: Setup
    gpu: dict[str, int]  # items of the peak phase, per rank
    gpu_phases: dict[str, int]  # peak of each phase
    gpu_peak: int
    host: dict[str, int]  # per rank
    host_peak_rank: int
    host_peak_node: int
    nvme: int
    tail_params: int  # per rank
    host_params: int  # per rank
    speculate: bool  # snapshot kept
    times: dict[str, float] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)  # tier -> fits | tight | no | unknown
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return "no" not in self.verdicts.values()


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _rank_units(shape: ModelShape, world: int) -> list[list[int]]:
    """Rank 0's shard sizes (the largest: FSDP2 chunks rows like ``torch.chunk``) per unit."""
    out = []
    for unit in shape.units:
        sizes = []
        for s in unit:
            if not s:
                sizes.append(1)
                continue
            rows = math.ceil(s[0] / world)
            sizes.append(min(rows, s[0]) * math.prod(s[1:]))
        out.append(sizes)
    return out


def _buckets(shape: ModelShape, setup: Setup):
    from heavylift.offload.buckets import ParamSpec, plan_buckets
    units = [[ParamSpec(f"u{u}p{i}", n, 0) for i, n in enumerate(sizes)]
             for u, sizes in enumerate(_rank_units(shape, setup.world))]
    return plan_buckets(units, setup.bucket_params)


def _tail_ratio(shape: ModelShape, setup: Setup, machine: Machine) -> float:
    """offload.ratio as the engine would pick it."""
    if setup.tail_ratio is not None:
        return 1.0 - setup.tail_ratio
    if machine.gpu_total_bytes is None:
        return 1.0
    root = shape.root_params / setup.world
    return 1.0 - (root / (shape.params / setup.world)
                  if root * TAIL_BYTES <= machine.gpu_total_bytes * AUTO_TAIL_CARD_FRACTION else 0.0)


def block_activation_bytes_per_token(shape: ModelShape) -> tuple[int, int]:
    """(saved, backward working set) bytes per token of one decoder block, bf16 activations.

    Saved: two RMSNorms (fp32 input copy 4h, normalized 2h, output 2h), q/k/v and their RoPE copies
    (q, rotate_half(q), q_embed; the same for k; v), the attention output, the residual, the MLP
    (gate, up, silu(gate), product: 8 B x ffn). Working set in backward: the MLP and residual gradients."""
    h, f, q, kv = shape.hidden, shape.ffn, shape.q_dim, shape.kv_dim
    saved = 8 * h + 8 * h + 2 * (3 * q + 3 * kv + kv) + 2 * q + 2 * h + 8 * f
    if shape.qk_norm:
        saved += 6 * (q + kv)
    work = 6 * f + 6 * h
    return saved, work


def plan(shape: ModelShape, setup: Setup, machine: Machine = Machine(), rates: Rates | None = None) -> Plan:
    """Bytes per tier per rank, the verdict against ``machine`` and the step-time floor at ``rates``."""
    _check_setup(setup)
    world, db = setup.world, setup.dtype_bytes
    buckets = _buckets(shape, setup)
    from heavylift.offload.buckets import split_tail
    first_tail = split_tail(buckets, _tail_ratio(shape, setup, machine))
    host_buckets, tail_buckets = buckets[:first_tail], buckets[first_tail:]
    host_params = sum(b.numel for b in host_buckets)
    tail_params = sum(b.numel for b in tail_buckets)
    rank_params = host_params + tail_params

    # ---- GPU ----
    tokens = setup.mbs * setup.seq
    h = shape.hidden
    saved, work = block_activation_bytes_per_token(shape)
    blk = shape.max_block_params
    root = shape.root_params
    weights = db * rank_params
    tail_state = TAIL_BYTES * tail_params
    if setup.activation_checkpointing:
        stored = shape.layers * tokens * h * 2
        block_run = tokens * (saved + work)
    else:
        stored = shape.layers * tokens * (saved + 2 * h)
        block_run = tokens * work
    final_norm = tokens * h * 10  # last block output, fp32 copy, normalized input of the head
    if setup.loss_chunk_tokens:  # bf16 logits and their gradient, fp32 work for one chunk (not yet measured)
        loss = tokens * shape.vocab * 4 + min(setup.loss_chunk_tokens, tokens) * shape.vocab * 12
    else:
        loss = tokens * shape.vocab * 12
    root_gathered = db * root
    gathered_block = (2 * db + db + 4) * blk  # weights + prefetched next + bf16 grad + fp32 reduce-scatter input
    staging = 2 * 4 * max((b.numel for b in host_buckets), default=0)
    common = {"weights (bf16 shards)": weights, "GPU-tail optimizer state": tail_state}
    loss_phase = {**common, "gathered root unit (embeddings/head)": root_gathered,
                  "activations: stored block inputs" if setup.activation_checkpointing else
                  "activations: every block": stored,
                  "activations: final norm": final_norm,
                  ("loss: bf16 logits + grad, fp32 chunk" if setup.loss_chunk_tokens else
                   "loss: 3 x fp32 [tokens, vocab]"): loss}
    block_phase = {**common, "gathered root unit + its unsharded grad": 2 * root_gathered,
                   "activations: stored block inputs" if setup.activation_checkpointing else
                   "activations: every block": stored,
                   "activations: one block, recomputed + backward": block_run,
                   "gathered block (+prefetch, grad, fp32 RS)": gathered_block,
                   "transfer staging (fp32, 1 bucket each way)": staging}
    phases = {"loss": sum(loss_phase.values()), "block backward": sum(block_phase.values())}
    peak_phase = max(phases, key=phases.get)
    gpu_items = loss_phase if peak_phase == "loss" else block_phase

    # ---- host ----
    state_bytes = STATE_FORMATS[setup.state_format]
    pinned = PINNED_BYTES * host_params  # exact: the store page-locks its own buffers (offload/pinned.py)
    pageable = (state_bytes - PINNED_BYTES) * host_params
    load = setup.load_bytes * shape.params
    snapshot = (4 + state_bytes - PINNED_BYTES) * host_params  # second master + moments (12 B/param for fp32)
    speculate = setup.speculate
    avail = machine.host_available_bytes
    notes: list[str] = []
    # The engine decides after the model is loaded, from MemAvailable then, per rank.
    avail_then = None if avail is None else avail - setup.gpus_per_node * (setup.load_bytes * shape.params
                                                                            + HOST_RUNTIME_BYTES)
    if speculate and avail_then is not None and setup.gpus_per_node * host_params * 28 > 0.9 * avail_then:
        speculate = False
        notes.append(f"speculation snapshot ({snapshot / GiB:.1f} GiB/rank) does not fit beside the state: "
                     "the engine turns offload.speculate off (CPU buckets then step after backward)")
    host = {"pinned: master + grad slot" if setup.pin else "master + grad slot": pinned,
            "pageable: exp_avg + exp_avg_sq": pageable,
            "pageable: speculation snapshot": snapshot if speculate else 0,
            "model as loaded (until sharded)": load,
            "runtime (torch, CUDA, allocator)": HOST_RUNTIME_BYTES}
    if not machine.has_cuda and machine.gpu_total_bytes is None:  # training on the CPU: the device is RAM
        host["compute device = CPU (weights, activations)"] = phases[peak_phase]
    host_rank = sum(host.values())
    result = Plan(shape=shape, setup=setup, gpu=gpu_items, gpu_phases=phases, gpu_peak=phases[peak_phase],
                  host=host, host_peak_rank=host_rank, host_peak_node=host_rank * setup.gpus_per_node, nvme=0,
                  tail_params=tail_params, host_params=host_params, speculate=speculate, notes=notes)
    if rates is not None:
        result.times = floor_times(shape, setup, host_params, rates)
    _verdicts(result, machine)
    return result


def floor_times(shape: ModelShape, setup: Setup, host_params_rank: int, rates: Rates) -> dict[str, float]:
    k = 8 if setup.activation_checkpointing else 6
    t_gpu = k * shape.params * setup.tokens_per_step / (setup.world * rates.gpu_tflops * 1e12)
    t_cpu = host_params_rank * setup.gpus_per_node / rates.cpu_params_per_s
    t_link = 8 * host_params_rank / (LINK_DUPLEX * rates.link_gbs * 1e9)
    return {"gpu": t_gpu, "cpu": t_cpu, "link": t_link, "floor": max(t_gpu, t_cpu, t_link),
            "serial": t_gpu + t_cpu + t_link}


def _verdict(need: int, have: int | None, uncertainty: float) -> str:
    if have is None:
        return "unknown"
    if need * (1 + uncertainty) <= have:
        return "fits"
    if need * (1 - uncertainty) <= have:
        return "tight"
    return "no"


def _verdicts(p: Plan, m: Machine) -> None:
    v = p.verdicts
    v["gpu"] = _verdict(p.gpu_peak, m.gpu_usable, GPU_UNCERTAINTY)
    v["host"] = _verdict(p.host_peak_node, m.host_available_bytes, HOST_UNCERTAINTY)
    pinned = next(iter(p.host.values()))
    if p.setup.pin and m.has_cuda and m.memlock_bytes is not None:
        v["pinned"] = "fits" if pinned <= m.memlock_bytes else "no"
    if v["gpu"] in ("no", "tight"):
        p.reasons.append(f"GPU: peak {p.gpu_peak / GiB:.1f} GiB per rank ({max(p.gpu_phases, key=p.gpu_phases.get)} "
                         f"phase, +-{GPU_UNCERTAINTY:.0%}) against {m.gpu_usable / GiB:.1f} GiB usable")
    if v["host"] in ("no", "tight"):
        p.reasons.append(f"host: {p.host_peak_node / GiB:.1f} GiB per node ({p.setup.gpus_per_node} rank(s) x "
                         f"{p.host_peak_rank / GiB:.1f} GiB) against {m.host_available_bytes / GiB:.1f} GiB available")
    if v.get("pinned") == "no":
        p.reasons.append(f"pinned: {pinned / GiB:.1f} GiB per rank but `ulimit -l` allows "
                         f"{m.memlock_bytes / GiB:.2f} GiB: raise it (ulimit -l unlimited / --ulimit memlock=-1) "
                         "or set engine.offload.pin_memory false")


# ---------------------------------------------------------------------------------------------------
# What would make it fit
# ---------------------------------------------------------------------------------------------------
def suggest(shape: ModelShape, setup: Setup, machine: Machine, p: Plan) -> list[str]:
    """Settings that would fit, each found by re-planning with one change."""
    out: list[str] = []

    def ok(tier: str, **changes) -> bool:
        q = plan(shape, dataclasses.replace(setup, **changes), machine)
        return q.verdicts.get(tier) in ("fits", "tight")

    if p.verdicts.get("gpu") == "no":
        if not setup.activation_checkpointing and ok("gpu", activation_checkpointing=True):
            out.append("turn activation checkpointing on (engine.activation_checkpointing true)")
        if p.tail_params and ok("gpu", tail_ratio=0.0):
            out.append("keep no optimizer state on the GPU (engine.offload.ratio 1.0)")
        for mbs in range(setup.mbs - 1, 0, -1):
            if ok("gpu", mbs=mbs):
                out.append(f"micro-batch {mbs} (engine.batch.micro_batch_size; raise grad_accum to keep the batch)")
                break
        seq = setup.seq // 2
        while seq >= 128:
            if ok("gpu", seq=seq):
                out.append(f"sequence length {seq} or less")
                break
            seq //= 2
        for g in (2, 4, 8, 16, 32, 64):
            if g > setup.world and ok("gpu", gpus_per_node=g // setup.nodes if g % setup.nodes == 0 else g,
                                      nodes=setup.nodes if g % setup.nodes == 0 else 1):
                out.append(f"{g} GPUs in all (weights shard across ranks; activations do not)")
                break
    if p.verdicts.get("host") == "no":
        if setup.speculate and p.speculate:
            out.append("engine.offload.speculate false (saves 12 B/param of host RAM)")
        for r in (0.25, 0.5, 0.75):
            if (setup.tail_ratio or 0.0) < r and ok("host", tail_ratio=r) and ok("gpu", tail_ratio=r):
                out.append(f"keep {r:.0%} of the optimizer state on the GPU (engine.offload.ratio {1 - r:g})")
                break
        for k in (2, 4, 8, 16):
            if k > setup.nodes and ok("host", nodes=k):
                out.append(f"{k} nodes (the state shards across every rank; more GPUs per node do not reduce it)")
                break
        load = setup.load_bytes * shape.params * setup.gpus_per_node
        if load > 0.25 * p.host_peak_node:
            out.append(f"the model is loaded in full on every rank before sharding ({load / GiB:.0f} GiB per node): "
                       "fewer ranks per node, or a loader that materializes only each rank's shards (not built yet)")
        out.append("a compact optimizer state format (bf16 master / 8-bit moments) once one exists")
    if p.verdicts.get("pinned") == "no":
        out.append("raise `ulimit -l` or set engine.offload.pin_memory false")
    return out


# ---------------------------------------------------------------------------------------------------
# This machine
# ---------------------------------------------------------------------------------------------------
def mem_available() -> int | None:
    from heavylift.offload.preflight import mem_available_bytes
    return mem_available_bytes()


def memlock_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def this_machine(gpu_mem_gib: float | None = None, host_mem_gib: float | None = None,
                 device_index: int | None = None) -> Machine:
    """The machine this runs on; ``gpu_mem_gib`` / ``host_mem_gib`` describe another one instead."""
    import torch
    cuda = torch.cuda.is_available()
    total = free = None
    name = ""
    if gpu_mem_gib is not None:
        total = int(gpu_mem_gib * GiB)
    elif cuda:
        idx = device_index if device_index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        free, total = torch.cuda.mem_get_info(idx)
        free += CUDA_CONTEXT_BYTES  # mem_get_info already sees this process's context; usable subtracts it
        name = torch.cuda.get_device_name(idx)
    host = int(host_mem_gib * GiB) if host_mem_gib is not None else mem_available()
    return Machine(gpu_total_bytes=total, gpu_free_bytes=free, host_available_bytes=host,
                   memlock_bytes=None if host_mem_gib is not None or gpu_mem_gib is not None else memlock_limit(),
                   has_cuda=cuda, gpu_name=name)


def probe_rates(gpu_tflops: float | None = None, cpu_params_per_s: float | None = None,
                link_gbs: float | None = None, threads: int | None = None) -> Rates:
    """Stated rates, else short probes of this machine (a second or two each), else defaults."""
    import torch
    cuda = torch.cuda.is_available()
    src = ["given", "given", "given"]
    if gpu_tflops is None:
        gpu_tflops, src[0] = (_probe_matmul(), "probed") if cuda else (DEFAULT_GPU_TFLOPS, "assumed (H100 matmul)")
    if cpu_params_per_s is None:
        cpu_params_per_s, src[1] = _probe_adamw(threads), "probed"
    if link_gbs is None:
        link_gbs, src[2] = (_probe_link(), "probed") if cuda else (DEFAULT_LINK_GBS, "assumed")
    return Rates(gpu_tflops, cpu_params_per_s, link_gbs, tuple(src))


def _probe_matmul(n: int = 8192, reps: int = 10) -> float:
    import torch
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def _probe_adamw(threads: int | None = None, n: int = 64 * 1024 * 1024, reps: int = 2) -> float:
    """Fused CPU AdamW params/s over ``n`` fp32 params with the optimizer's threads (whole host: the
    per-rank rate x ranks per node is bounded by memory bandwidth, so this is the single-rank rate)."""
    import torch
    from heavylift.optim.adamw import AdamWHyper, adamw_step_
    if threads is None:
        from heavylift.engine import auto_cpu_threads
        threads = auto_cpu_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p, g, m, v = (torch.zeros(n) for _ in range(4))
        step = [torch.zeros(())]
        hp = AdamWHyper(1e-5, 0.9, 0.999, 1e-8, 0.0)
        adamw_step_([p], [g], [m], [v], step, hp)
        t = time.perf_counter()
        for _ in range(reps):
            adamw_step_([p], [g], [m], [v], step, hp)
        return n * reps / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)


def _probe_link(nbytes: int = 512 * 1024**2) -> float:
    import torch
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * nbytes / (time.perf_counter() - t) / 1e9


def _check_setup(s: Setup) -> None:
    for key in ("gpus_per_node", "nodes", "seq", "mbs", "accum"):
        if getattr(s, key) < 1:
            raise HeavyliftError(f"{key.replace('_', ' ')} must be an integer >= 1, not {getattr(s, key)}")
    if s.state_format not in STATE_FORMATS:
        raise HeavyliftError(f"state format {s.state_format!r} does not exist yet: use {', '.join(STATE_FORMATS)}")
    if s.tail_ratio is not None and not 0.0 <= s.tail_ratio <= 1.0:
        raise HeavyliftError(f"tail ratio must be in [0, 1] (the fraction of parameters stepped on the GPU), "
                             f"not {s.tail_ratio}")


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------
def render(p: Plan, machine: Machine, rates: Rates | None) -> str:
    s, sh = p.setup, p.shape
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    lines = [f"heavylift estimate: {sh.name}, {sh.params / 1e9:.2f} B params ({sh.layers} blocks, hidden {sh.hidden}, "
             f"vocab {sh.vocab})",
             f"  {s.nodes} node(s) x {s.gpus_per_node} GPU(s) = {s.world} rank(s); seq {s.seq}, micro-batch {s.mbs}, "
             f"grad accum {s.accum} = {s.tokens_per_step:,} tokens/step; activation checkpointing "
             f"{'on' if s.activation_checkpointing else 'off'}; state {s.state_format}; "
             f"GPU tail {p.tail_params / max(p.tail_params + p.host_params, 1):.0%} of params",
             "", f"{'tier / item (per rank)':52s}{'bytes':>13s}"]
    phase = max(p.gpu_phases, key=p.gpu_phases.get)
    lines.append(f"GPU  (peak in the {phase} phase)")
    for k, b in p.gpu.items():
        lines.append(f"  {k:50s}{g(b)}")
    lines.append(f"  {'peak allocated':50s}{g(p.gpu_peak)}")
    lines.append(f"  {'(other phase: ' + ', '.join(f'{n} {b / GiB:.1f} GiB' for n, b in p.gpu_phases.items() if n != phase) + ')':50s}")
    lines.append("host")
    for k, b in p.host.items():
        lines.append(f"  {k:50s}{g(b)}")
    lines.append(f"  {'peak per rank':50s}{g(p.host_peak_rank)}")
    lines.append(f"  {f'peak per node ({s.gpus_per_node} rank(s))':50s}{g(p.host_peak_node)}")
    lines.append(f"NVMe{'':48s}{g(p.nvme)}")
    lines.append("")
    have_gpu = "unknown" if machine.gpu_usable is None else f"{machine.gpu_usable / GiB:.1f} GiB usable"
    have_host = "unknown" if machine.host_available_bytes is None else \
        f"{machine.host_available_bytes / GiB:.1f} GiB available"
    lines.append(f"fits: GPU {p.verdicts['gpu']} ({have_gpu}); host {p.verdicts['host']} ({have_host})"
                 + (f"; pinned {p.verdicts['pinned']}" if "pinned" in p.verdicts else ""))
    for r in p.reasons:
        lines.append(f"  {r}")
    if p.suggestions:
        lines.append("to fit:")
        lines.extend(f"  - {x}" for x in p.suggestions)
    for n in p.notes:
        lines.append(f"note: {n}")
    if rates is not None and p.times:
        t = p.times
        lines += ["", "step-time floor (per optimizer step)",
                  f"  GPU  8PT/(NF) at {rates.gpu_tflops:.0f} TFLOP/s ({rates.sources[0]}){'':5s}{t['gpu']:8.3f} s"
                  if s.activation_checkpointing else
                  f"  GPU  6PT/(NF) at {rates.gpu_tflops:.0f} TFLOP/s ({rates.sources[0]}){'':5s}{t['gpu']:8.3f} s",
                  f"  CPU  AdamW at {rates.cpu_params_per_s / 1e9:.2f} G params/s/host ({rates.sources[1]}, "
                  f"{28 * rates.cpu_params_per_s / 1e9:.0f} GB/s){'':1s}{t['cpu']:8.3f} s",
                  f"  link 4 B/p down + 4 B/p up at {rates.link_gbs:.0f} GB/s ({rates.sources[2]}) x{LINK_DUPLEX} duplex"
                  f" {t['link']:8.3f} s",
                  f"  floor (overlapped: max) {t['floor']:.3f} s = {s.tokens_per_step / t['floor']:,.0f} tokens/s; "
                  f"serial sum {t['serial']:.3f} s"]
    return "\n".join(lines)


def estimate(model, setup: Setup, machine: Machine, rates: Rates | None = None) -> Plan:
    """Plan + suggestions: what the CLI and the preflight use."""
    shape = model if isinstance(model, ModelShape) else model_shape(model)
    p = plan(shape, setup, machine, rates)
    if not p.fits or "tight" in p.verdicts.values():
        p.suggestions = suggest(shape, setup, machine, p)
    return p


# ---------------------------------------------------------------------------------------------------
# The ``train`` preflight
# ---------------------------------------------------------------------------------------------------
def setup_for_train(cfg, cuda: bool) -> Setup:
    """The :class:`Setup` a :class:`~heavylift.config.train.TrainConfig` runs, on this launch's ranks."""
    e = cfg.engine
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    local = max(min(local, world), 1)
    return Setup(gpus_per_node=local, nodes=max(world // local, 1), seq=cfg.seq_len, mbs=e.batch.micro_batch_size,
                 accum=e.batch.grad_accum, activation_checkpointing=e.activation_checkpointing,
                 speculate=e.offload.speculate, tail_ratio=None if e.offload.ratio is None else 1.0 - e.offload.ratio,
                 bucket_params=e.offload.bucket_params, dtype_bytes=4 if e.precision.dtype == "fp32" else 2,
                 pin=e.offload.pin_memory and cuda, load_bytes=4, loss_chunk_tokens=e.loss_chunk_tokens,
                 state_format=e.offload.state_format)


def check_train(cfg, machine: Machine | None = None, warn=print) -> Plan | None:
    """Refuse (HeavyliftError, with the numbers and what would fit) a run this machine cannot hold; warn when
    the estimate is within its uncertainty. ``HEAVYLIFT_PREFLIGHT=0`` skips it."""
    if os.environ.get("HEAVYLIFT_PREFLIGHT", "1") == "0":
        return None
    if machine is None:
        machine = this_machine()
    setup = setup_for_train(cfg, machine.has_cuda)
    p = estimate(cfg.model, setup, machine)
    head = (f"{p.shape.name} ({p.shape.params / 1e9:.2f} B params), seq {setup.seq}, micro-batch {setup.mbs}, "
            f"{setup.world} rank(s)")
    if not p.fits:
        fix = "; ".join(p.suggestions) if p.suggestions else "a larger machine"
        raise HeavyliftError(f"preflight: this run cannot fit: {head}: {'; '.join(p.reasons)}. Would fit with: {fix} "
                             "(HEAVYLIFT_PREFLIGHT=0 skips this check)")
    if "tight" in p.verdicts.values():
        warn(f"heavylift: warning: preflight: tight fit, within the estimate's uncertainty: {head}: "
             f"{'; '.join(p.reasons)}")
    for n in p.notes:
        warn(f"heavylift: note: {n}")
    return p
