"""The ``train`` preflight: the plan checked against the real machine before anything is allocated."""

from __future__ import annotations

import dataclasses
import os

from heavylift.config.errors import HeavyliftError
from heavylift.config.schema import assist_wanted
from heavylift.models.compute_dtype import resolve_dtype
from heavylift.memory.machine import capped, this_machine
from heavylift.memory.estimate import estimate
from heavylift.memory.plan import Machine, Plan, Setup, slot_of
from heavylift.memory.render import format_line


def setup_for_train(cfg, cuda: bool) -> Setup:
    """The :class:`Setup` a :class:`~heavylift.config.train.TrainConfig` runs, on this launch's ranks."""
    return setup_for_engine(cfg.engine, cfg.seq_len, cuda, load_bytes=4 if cfg.model == "default" else 0)


def setup_for_engine(e, seq_len: int, cuda: bool, load_bytes: int = 0) -> Setup:
    """The :class:`Setup` an :class:`~heavylift.config.schema.EngineConfig` runs at ``seq_len``, on this launch's
    ranks; ``load_bytes`` 0: the model is on the meta device, drawn or streamed per rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    local = max(min(local, world), 1)
    dtype = resolve_dtype(e.precision.dtype, cuda)
    return Setup(gpus_per_node=local, nodes=max(world // local, 1), seq=seq_len, mbs=e.batch.micro_batch_size,
                 accum=e.batch.grad_accum, activation_checkpointing=e.activation_checkpointing,
                 speculate=e.offload.speculate, tail_ratio=None if e.offload.ratio is None else 1.0 - e.offload.ratio,
                 bucket_params=e.offload.bucket_params, dtype_bytes=4 if dtype == "fp32" else 2,
                 compute_dtype=dtype, grad_slot=e.offload.grad_slot,
                 pin=e.offload.pin_memory and cuda, loss_chunk_tokens=e.loss_chunk_tokens,
                 load_bytes=load_bytes, state_format=e.offload.state_format, offload_device=e.offload.device,
                 nvme_ratio=e.offload.nvme_ratio, nvme_buffers=e.offload.nvme_buffers,
                 # auto: the share is chosen at run time; the planner needs only that every buffer is pinned
                 gpu_assist=float(assist_wanted(e.offload, cuda)) if e.offload.gpu_assist == "auto" else e.offload.gpu_assist,
                 compiled=cuda and e.compile != "off", host_accumulate=e.offload.accumulate == "host",
                 save_attention=e.save_attention)


def estimate_assisted(model, setup: Setup, machine: Machine, rates=None, auto: bool = False) -> Plan:
    """The estimate; with ``gpu_assist: auto`` planned as on (every host state buffer pinned), planned again
    with the assist off where ``ulimit -l`` cannot pin that, as the engine then turns it off rather than refuse
    a run that fits without it (offload/assist_share.py auto_assist_pinnable)."""
    p = estimate(model, setup, machine, rates)
    if auto and setup.gpu_assist > 0 and p.verdicts.get("pinned") == "no":
        p = estimate(model, dataclasses.replace(setup, gpu_assist=0.0), machine, rates)
        p.notes.append("offload.gpu_assist auto will be off: pinning every host state buffer exceeds `ulimit -l` "
                       f"({machine.memlock_bytes / 2**30:.1f} GiB); raise it to let clipped steps share the CPU's "
                       "pass with the GPU")
    return p


def check_train(cfg, machine: Machine | None = None, warn=print) -> Plan | None:
    """Refuse (HeavyliftError, with the numbers and what would fit) a run this machine cannot hold; warn when
    the estimate is within its uncertainty. ``HEAVYLIFT_PREFLIGHT=0`` skips it. With offload.device nvme the
    state files are checked against offload.nvme_path's free space (a path that cannot hold them at all is
    refused as the engine would: missing, not a directory, not writable)."""
    if os.environ.get("HEAVYLIFT_PREFLIGHT", "1") == "0":
        return None
    o = cfg.engine.offload
    if machine is None:
        machine = this_machine(nvme_path=o.nvme_path if o.device == "nvme" else "")
    machine = capped(machine, cfg.engine.gpu_memory_gib)  # engine.gpu_memory_gib: what the run may use
    if o.device == "nvme" and machine.nvme_free_bytes is None:
        from heavylift.offload.nvme import check_nvme_path
        check_nvme_path(o.nvme_path, 0)
    setup = setup_for_train(cfg, machine.has_cuda)
    p = estimate_assisted(cfg.model, setup, machine, auto=o.gpu_assist == "auto")
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
    warn(f"heavylift: {format_line(setup.state_format, slot_of(setup)).strip()}")
    return p
