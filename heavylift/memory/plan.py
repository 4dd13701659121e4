"""The memory planner: bytes per tier per rank and the step-time floor (memory/checks.py judges whether it
fits; memory/estimate.py adds what would fit)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from heavylift.memory.checks import check_setup, verdicts
from heavylift.memory.constants import (
    AUTO_TAIL_CARD_FRACTION, CUDA_CONTEXT_BYTES, DEFAULT_NVME_GBS, GPU_UNCERTAINTY, GiB, HOST_FIT_FRACTION,
    HOST_RUNTIME_BYTES, FP32_ADAMW_TRAFFIC, LINK_DUPLEX, STATE_FORMATS,
)
from heavylift.memory.constants import StateFormat as HostFormat
from heavylift.memory.model import ModelShape
from heavylift.offload.nvme import file_bytes, region_layout
from heavylift.offload.preflight import nvme_split
from heavylift.offload.tail import MARGIN_BYTES, MARGIN_FRACTION, buckets_to_move, tail_param_bytes
from heavylift.optim import grad_slot
from heavylift.optim.formats import FORMATS, SELF_TAILED, StateFormat
from heavylift.optim.quant import BLOCK
from heavylift.shard.selective import saved_bytes_per_token


@dataclass(frozen=True)
class Setup:
    """The run being planned."""

    gpus_per_node: int = 1
    nodes: int = 1
    seq: int = 4096
    mbs: int = 1
    accum: int = 1
    activation_checkpointing: bool = True
    state_format: str = "fp32"  # a name in STATE_FORMATS; "auto" in estimate(): the first that fits
    speculate: bool = True
    # Fraction of parameters whose optimizer state is on the GPU (= 1 - offload.ratio); None: as the
    # engine chooses it (the root unit if its state fits a tenth of the card, else none).
    tail_ratio: float | None = None
    bucket_params: int = 200_000_000
    dtype_bytes: int = 2  # compute dtype of the GPU weights: 2 for bf16/fp16, 4 for fp32
    compute_dtype: str = "bf16"  # precision.dtype: with bf16 the gradients FSDP2 hands over are bf16
    grad_slot: str = "auto"  # offload.grad_slot (optim/grad_slot.py resolves "auto")
    pin: bool = True  # pinned transfer buffers (the engine pins when CUDA exists and offload.pin_memory)
    # Bytes/param of the whole model each rank holds on the CPU while the engine is built; 0: none, the
    # model is on the meta device and the engine draws or streams one unit at a time (heavylift train).
    load_bytes: int = 0
    # engine.compile on (CUDA, compile auto|on): a block keeps what kept_block_bytes_per_token counts for its
    # backward instead of the eager block's activations (block_activation_bytes_per_token)
    compiled: bool = False
    # engine.save_attention: a checkpointed block also keeps its attention output and log-sum-exp
    save_attention: bool = False
    # engine.loss_chunk_tokens: 0 is the model's own loss (fp32 logits for the whole batch)
    loss_chunk_tokens: int = 8192
    # offload.device: "nvme" keeps the state of the host buckets that do not fit in RAM in files (offload/nvme.py)
    offload_device: str = "cpu"
    # offload.nvme_ratio: fraction of the host buckets' parameters on NVMe; None: the engine's rule
    # (offload/preflight.py nvme_split: as much in RAM as fits 85% of MemAvailable)
    nvme_ratio: float | None = None
    nvme_buffers: int = 3  # offload.nvme_buffers: buffer sets in the ring, each the size of the largest NVMe bucket
    # offload.gpu_assist > 0: every RAM bucket's state buffers are pinned (offload/assist.py sends them up and back)
    gpu_assist: float = 0.0
    # offload.accumulate "host": with accum > 1 the host buckets' micro-batch sums live in their host slots
    # (offload/accumulate.py), so the card keeps only the GPU tail's accumulated gradients
    host_accumulate: bool = False

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
    nvme_free_bytes: int | None = None  # free space at offload.nvme_path (or --nvme-free-gib)
    nvme_path: str = ""

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
    nvme_gbs: float = DEFAULT_NVME_GBS  # the disk at offload.nvme_path, reads and writes together, per node
    nvme_source: str = "assumed"


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
    nvme: int  # per rank: the state file of its NVMe buckets (master + moments + scales, 4 KiB-aligned regions)
    tail_params: int  # per rank
    host_params: int  # per rank
    speculate: bool  # snapshot kept
    times: dict[str, float] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)  # tier -> fits | tight | no | unknown
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    formats: list = field(default_factory=list)  # memory.formats.FormatOption per state format
    format_choice: tuple[str, str] = ("", "")  # (the format that fits, why)
    gpu_settled: int = 0  # on CUDA with the automatic placement: the peak once it has spent the card
    nvme_params: int = 0  # per rank: parameters whose state is on NVMe (part of host_params)
    pinned: int = 0  # per rank: page-locked host bytes (what `ulimit -l` must allow)

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
    """offload.ratio as the engine would pick it: on a card of known size, the tail placed at init."""
    if setup.tail_ratio is not None:
        return 1.0 - setup.tail_ratio
    if machine.gpu_total_bytes is None:
        return 1.0
    buckets = _buckets(shape, setup)
    n = buckets_to_move([b.numel for b in buckets],
                        init_tail_params(shape, setup, machine.gpu_total_bytes, machine.host_available_bytes))
    return 1.0 - sum(b.numel for b in buckets[len(buckets) - n:]) / max(sum(b.numel for b in buckets), 1)


def root_tail_params(root_params: int, tail_bytes: float, gpu_total_bytes: int) -> int:
    """The root unit's (embeddings/head) parameters per rank if their GPU-tail state fits a tenth of the
    card, else 0: its gradients arrive last, so its step is the cheapest to take off the CPU."""
    return root_params if root_params * tail_bytes <= gpu_total_bytes * AUTO_TAIL_CARD_FRACTION else 0


def init_tail_params(shape: ModelShape, setup: Setup, gpu_total_bytes: int, host_available: int | None = None) -> int:
    """Parameters (per rank) whose optimizer state the engine places on the GPU at init, when offload.ratio
    is unset: what the card holds beyond this planner's peak with no tail (raised by its uncertainty) and
    the placement's margin, in the tail format's bytes, but no more than the host needs to hold the rest
    within 90% of ``host_available`` (per node) when that is known; and at least the root unit
    (embeddings/head) where its state fits a tenth of the card, as before there was a planner at init.

    The tail at init is there to keep the host's peak inside its RAM (state that would otherwise be
    allocated on the host and moved to the GPU a few steps later), not for speed: where the host holds the
    whole state, the measured placement decides (offload/placement.py), and it may give the card to blocks
    that keep their activations rather than to more tail (one H200, qwen3-4b at 16K tokens: 35 of 37
    buckets on the GPU and 31 of 36 blocks keeping their activations, 0.900 s/step)."""
    base = plan(shape, dataclasses.replace(setup, tail_ratio=0.0), Machine(has_cuda=True))  # compute on a GPU
    spare = gpu_total_bytes * (1.0 - MARGIN_FRACTION) - MARGIN_BYTES - CUDA_CONTEXT_BYTES \
        - base.gpu_peak * (1.0 + GPU_UNCERTAINTY)
    tail_bytes = _tail_param_bytes(setup)
    fit = max(int(spare // tail_bytes), 0)
    floor = root_tail_params(shape.root_params // setup.world, tail_bytes, gpu_total_bytes)
    if host_available is None:
        return max(fit, floor)
    fmt = host_format(setup)
    per_param = setup.gpus_per_node * (fmt.host + (fmt.second_set if setup.speculate else 0))
    short = base.host_peak_node - HOST_FIT_FRACTION * host_available
    return max(min(fit, max(math.ceil(short / per_param), 0)), floor)


def _placement_settles(peak: int, setup: Setup, machine: Machine, shape: ModelShape, host_params: int) -> int:
    """The GPU peak after the automatic placement (offload.ratio unset, a CUDA card of known size), or 0
    where it does not apply: it fills the card to its margin (offload/tail.py), unless everything it can
    buy fits below that: all host state as GPU tail and every block keeping its activations."""
    if setup.tail_ratio is not None or not machine.gpu_total_bytes:
        return 0
    target = int(machine.gpu_total_bytes * (1.0 - MARGIN_FRACTION) - MARGIN_BYTES)
    everything = peak + int(host_params * _tail_param_bytes(setup))
    if setup.activation_checkpointing:
        everything += shape.layers * setup.mbs * setup.seq * kept_block_bytes_per_token(shape)
    return min(target, everything) if target > peak else 0


def kept_block_bytes_per_token(shape: ModelShape) -> int:
    """What one compiled block keeps for its backward when it stops recomputing, per token (bf16): the
    matmul inputs (two norm outputs, attention output, the MLP product), q/k/v after RoPE, the two
    residual inputs, gate and up: 8h + 4q + 4kv + 6f. For qwen3-4b that is 1.52 GiB at 16K tokens; the
    placement's probe measured 1.40 GiB (H100, session 2)."""
    h, f, q, kv = shape.hidden, shape.ffn, shape.q_dim, shape.kv_dim
    return 8 * h + 4 * q + 4 * kv + 6 * f


def _format(setup: Setup) -> StateFormat:
    return FORMATS[setup.state_format]


def slot_of(setup: Setup) -> str:
    """The gradient slot ("fp32" or "bf16") the engine gives this setup's host buckets."""
    return grad_slot.resolve(setup.grad_slot, setup.state_format, setup.compute_dtype)


def host_format(setup: Setup, name: str | None = None) -> HostFormat:
    """The planner's bytes/param of format ``name`` (default: the setup's) with the gradient slot the
    engine would give it (offload.grad_slot resolved as the engine resolves it)."""
    name = name or setup.state_format
    slot = grad_slot.resolve(setup.grad_slot, name, setup.compute_dtype)
    return dataclasses.replace(STATE_FORMATS[name], grad=float(grad_slot.slot_bytes(slot)))


def _tail_format(setup: Setup) -> StateFormat:
    f = FORMATS.get(setup.state_format)  # a format the planner knows but the store does not: an fp32 tail
    return FORMATS[f.tail if f is not None else "fp32"]


def _tail_param_bytes(setup: Setup) -> float:
    return tail_param_bytes(_tail_format(setup).state_bytes, setup.dtype_bytes, setup.host_accumulate, setup.accum)


def _stored_name(setup: Setup) -> str:
    return "activations: stored block inputs" + (" + attention outputs" if setup.save_attention else "")


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
    check_setup(setup)
    assert setup.state_format != "auto", "estimate() resolves state_format 'auto'"
    db = setup.dtype_bytes
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
    if setup.compiled:
        saved = kept_block_bytes_per_token(shape)
    blk = shape.max_block_params
    root = shape.root_params
    weights = db * rank_params
    tail_state = int(_tail_format(setup).state_bytes * tail_params)
    if setup.activation_checkpointing:
        stored = shape.layers * tokens * (h * 2 + (saved_bytes_per_token(shape.q_dim, shape.heads) if setup.save_attention else 0))
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
    if setup.accum > 1 and setup.host_accumulate:  # the tail sums on the card; a host bucket's partial goes up
        common["accumulated gradients (GPU-tail shards, accum > 1)"] = db * tail_params
        common["host accumulation: one bucket's partial sum, uploaded"] = db * max(
            (b.numel for b in host_buckets), default=0)
    elif setup.accum > 1:  # FSDP2 sums each micro-batch into the sharded .grad until the window's last backward
        common["accumulated gradients (bf16 shards, accum > 1)"] = db * rank_params
    loss_phase = {**common, "gathered root unit (embeddings/head)": root_gathered,
                  _stored_name(setup) if setup.activation_checkpointing else
                  "activations: every block": stored,
                  "activations: final norm": final_norm,
                  ("loss: bf16 logits + grad, fp32 chunk" if setup.loss_chunk_tokens else
                   "loss: 3 x fp32 [tokens, vocab]"): loss}
    block_phase = {**common, "gathered root unit + its unsharded grad": 2 * root_gathered,
                   _stored_name(setup) if setup.activation_checkpointing else
                   "activations: every block": stored,
                   "activations: one block, recomputed + backward": block_run,
                   "gathered block (+prefetch, grad, fp32 RS)": gathered_block,
                   "transfer staging (fp32, 1 bucket each way)": staging}
    phases = {"loss": sum(loss_phase.values()), "block backward": sum(block_phase.values())}
    peak_phase = max(phases, key=phases.get)
    gpu_items = loss_phase if peak_phase == "loss" else block_phase

    # ---- host (and NVMe) ----
    fmt = host_format(setup)
    # The whole model as loaded, or (meta) the largest unit drawn in fp32 / the largest tensor shard read.
    load = setup.load_bytes * shape.params if setup.load_bytes else 4 * shape.max_unit_params
    avail = machine.host_available_bytes
    notes: list[str] = []
    # The engine decides after the model is loaded, from MemAvailable then, per rank.
    avail_then = None if avail is None else avail - setup.gpus_per_node * (load + HOST_RUNTIME_BYTES)
    on_disk = [b.numel for b in host_buckets[:nvme_buckets(host_buckets, setup, avail_then)]]
    nvme_params = sum(on_disk)
    ram_params = host_params - nvme_params  # NVMe buckets keep only their gradient slot in RAM (pinned)
    ring = setup.nvme_buffers * max(on_disk, default=0)  # params of the ring's buffer sets (all state kinds)
    pinned = int(fmt.pinned * ram_params)  # exact: the store page-locks its own buffers (offload/pinned.py)
    snapshot = int(fmt.second_set * ram_params)  # second master + moments (12 B/param for fp32); never for NVMe
    speculate = setup.speculate
    # as the engine's _preflight: the RAM buckets' two sets, the NVMe buckets' slots and the ring
    both_sets = ram_params * (fmt.host + fmt.second_set) + nvme_params * fmt.grad + ring * fmt.second_set
    if speculate and avail_then is not None and setup.gpus_per_node * both_sets > 0.9 * avail_then:
        speculate = False
        notes.append(f"speculation buffer set ({snapshot / GiB:.1f} GiB/rank) does not fit beside the state: "
                     "the engine turns offload.speculate off (CPU buckets then step after backward)")
    back_pinned = int(fmt.master * ram_params)  # the second set's master is uploaded from: pinned
    pin = "pinned: " if setup.pin else ""
    # the assist pins every state buffer of both sets, as the engine's preflight counts it (formats the GPU steps)
    if setup.gpu_assist > 0 and setup.state_format in SELF_TAILED:
        pinned, back_pinned = int(fmt.host * ram_params), snapshot
        host = {pin + "state + grad slot (+ speculation set), all pinned for gpu_assist":
                pinned + back_pinned * speculate}
    else:
        host = {pin + "master + grad slot (+ back master)": pinned + back_pinned * speculate,
                "pageable: exp_avg + exp_avg_sq" + (" + compensation" if fmt.compensation else ""):
                    int(fmt.pageable * ram_params),
                "pageable: speculation buffer set (less its master)": (snapshot - back_pinned) if speculate else 0}
    if setup.offload_device == "nvme":
        host[pin + "NVMe buckets: grad slot"] = int(fmt.grad * nvme_params)
        host[f"NVMe ring: {setup.nvme_buffers} sets x largest NVMe bucket"] = int(fmt.second_set * ring)
    host["model as loaded (until sharded)" if setup.load_bytes else "model loading: largest unit, fp32"] = load
    host["runtime (torch, CUDA, allocator)"] = HOST_RUNTIME_BYTES
    if not machine.has_cuda and machine.gpu_total_bytes is None:  # training on the CPU: the device is RAM
        host["compute device = CPU (weights, activations)"] = phases[peak_phase]
    host_rank = sum(host.values())
    settled = _placement_settles(phases[peak_phase], setup, machine, shape, host_params)
    if settled:
        moved = min(int((settled - phases[peak_phase]) // _tail_param_bytes(setup)), host_params)
        target = machine.gpu_total_bytes * (1.0 - MARGIN_FRACTION) - MARGIN_BYTES
        notes.append(f"the automatic placement then spends the card up to {settled / GiB:.1f} GiB (offload/placement.py): "
                     + ("all host state becomes GPU tail and every block keeps its activations (all of it fits "
                        f"below {target / GiB:.1f} GiB)" if settled < target else
                        f"GPU tail first, blocks that keep their activations next; at most {moved / 1e9:.2f} B params "
                        f"leave the host, {moved * (fmt.host + fmt.second_set * speculate) / GiB:.1f} GiB of its state"))
    result = Plan(shape=shape, setup=setup, gpu=gpu_items, gpu_phases=phases, gpu_peak=phases[peak_phase],
                  host=host, host_peak_rank=host_rank, host_peak_node=host_rank * setup.gpus_per_node,
                  nvme=nvme_file_bytes(setup.state_format, on_disk), tail_params=tail_params,
                  host_params=host_params, speculate=speculate, notes=notes, gpu_settled=settled,
                  nvme_params=nvme_params,
                  pinned=pinned + back_pinned * speculate + int(fmt.grad * nvme_params + fmt.master * ring))
    if rates is not None:
        result.times = floor_times(shape, setup, host_params, rates, result.nvme)
    verdicts(result, machine)
    return result


def nvme_buckets(host_buckets: list, setup: Setup, available: int | None) -> int:
    """How many host buckets (a prefix in arrival order) the engine puts on NVMe: offload/preflight.py's
    ``nvme_split`` with this setup's settings, ``available`` being MemAvailable when the engine decides."""
    if setup.offload_device != "nvme":
        return 0
    return nvme_split([b.numel for b in host_buckets], STATE_FORMATS[setup.state_format], setup.nvme_ratio,
                      available, setup.gpus_per_node, setup.nvme_buffers, grad_slot.slot_bytes(slot_of(setup)))


def nvme_file_bytes(name: str, numels: list[int]) -> int:
    """Bytes of one rank's state file for NVMe buckets of ``numels`` parameters: each bucket a region of the
    format's buffers (no gradient slot), each 4 KiB aligned (offload/nvme.py)."""
    f = FORMATS.get(name)
    regions = [[math.ceil(n * b.dtype.itemsize / (BLOCK if b.per_block else 1)) for b in f.buffers] if f else
               [math.ceil(n * STATE_FORMATS[name].second_set)] for n in numels]
    return file_bytes(region_layout(regions))


def floor_times(shape: ModelShape, setup: Setup, host_params_rank: int, rates: Rates,
                nvme_rank: int = 0) -> dict[str, float]:
    """Seconds per optimizer step of each resource, the floor (their max: they overlap) and the serial sum.
    ``nvme_rank``: bytes of one rank's state file, read once and written once per step (NVMe buckets do
    not speculate), by every rank of the node on the one disk."""
    k = 8 if setup.activation_checkpointing else 6
    t_gpu = k * shape.params * setup.tokens_per_step / (setup.world * rates.gpu_tflops * 1e12)
    fmt = host_format(setup)
    # The probed rate is the fp32 kernel's; the host is memory-bound (hardware.md), so a format's time
    # scales with its bytes of traffic.
    t_cpu = host_params_rank * setup.gpus_per_node * fmt.cpu_traffic / (FP32_ADAMW_TRAFFIC * rates.cpu_params_per_s)
    t_link = fmt.link * host_params_rank / (LINK_DUPLEX * rates.link_gbs * 1e9)
    t_nvme = 2 * nvme_rank * setup.gpus_per_node / (rates.nvme_gbs * 1e9)
    return {"gpu": t_gpu, "cpu": t_cpu, "link": t_link, "nvme": t_nvme, "floor": max(t_gpu, t_cpu, t_link, t_nvme),
            "serial": t_gpu + t_cpu + t_link + t_nvme}
