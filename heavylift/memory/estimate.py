"""``estimate``: the plan of ``memory/plan.py`` with the state format chosen for the machine and, where it
does not fit, the settings that would (each found by re-planning with one change)."""

from __future__ import annotations

import dataclasses

from heavylift.memory.constants import STATE_FORMATS, GiB
from heavylift.memory.formats import choose, format_options
from heavylift.memory.model import ModelShape, model_shape
from heavylift.memory.checks import check_setup, nvme_need
from heavylift.memory.plan import Machine, Plan, Rates, Setup, host_format, plan


def estimate(model, setup: Setup, machine: Machine, rates: Rates | None = None) -> Plan:
    """Plan + suggestions + which state format fits: what the CLI and the preflight use. A ``state_format``
    of "auto" plans with the format chosen (memory/formats.py)."""
    check_setup(setup)
    shape = model if isinstance(model, ModelShape) else model_shape(model)
    auto = setup.state_format == "auto"
    options = format_options(shape, dataclasses.replace(setup, state_format="fp32") if auto else setup, machine)
    chosen, why = choose(options, machine, setup)
    if auto:
        setup = dataclasses.replace(setup, state_format=chosen)
    p = plan(shape, setup, machine, rates)
    p.formats, p.format_choice = options, (chosen, why)
    if not p.fits or "tight" in p.verdicts.values():
        p.suggestions = suggest(shape, setup, machine, p)
    return p


def suggest(shape: ModelShape, setup: Setup, machine: Machine, p: Plan) -> list[str]:
    """Settings that would fit, each found by re-planning with one change."""
    out: list[str] = []

    def ok(*tiers: str, **changes) -> bool:
        q = plan(shape, dataclasses.replace(setup, **changes), machine)
        return all(q.verdicts.get(tier) in ("fits", "tight") for tier in tiers)

    if p.verdicts.get("gpu") == "no":
        if not setup.activation_checkpointing and ok("gpu", activation_checkpointing=True):
            out.append("turn activation checkpointing on (engine.activation_checkpointing true)")
        if p.tail_params and ok("gpu", tail_ratio=0.0):
            out.append("keep no optimizer state on the GPU (engine.offload.ratio 1.0)")
        smaller = range(setup.mbs - 1, 0, -1)
        accum_for = {m: -(-setup.mbs * setup.accum // m) for m in smaller}  # as many tokens per step (or a few more)
        # re-planned with that accumulation: it keeps the sharded bf16 gradients on the card (2 B/param)
        kept = next((m for m in smaller if ok("gpu", mbs=m, accum=accum_for[m])), None)
        if kept is not None:
            out.append(f"micro-batch {kept} with grad_accum {accum_for[kept]} (engine.batch.micro_batch_size, "
                       "engine.batch.grad_accum: as many tokens per step)")
        elif (fewer := next((m for m in smaller if ok("gpu", mbs=m, accum=setup.accum)), None)) is not None:
            out.append(f"micro-batch {fewer} (engine.batch.micro_batch_size: fewer tokens per step; raising "
                       f"grad_accum to {accum_for[fewer]} keeps the sharded gradients on the card and does not fit)")
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
        fmt = host_format(setup)
        if setup.speculate and p.speculate:
            out.append(f"engine.offload.speculate false (saves {fmt.second_set:g} B/param of host RAM)")
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
                       "give a preset or a safetensors directory (heavylift train streams each rank's shards)")
        for name in STATE_FORMATS:
            other = host_format(setup, name)
            if other.host < fmt.host and ok("host", state_format=name):
                out.append(f"engine.offload.state_format {name} ({other.host:.2f} B/param of host state instead of "
                           f"{fmt.host:.2f})" if other.built else
                           f"the {name} state format ({other.host:.2f} B/param) once it is built")
                if other.built:
                    break
        out += _nvme_for_host(shape, setup, machine)
    if p.verdicts.get("nvme") == "no":
        out += _nvme_space(shape, setup, machine, p, ok)
    if p.verdicts.get("pinned") == "no":
        out.append("raise `ulimit -l` or set engine.offload.pin_memory false")
    return out


def _nvme_for_host(shape: ModelShape, setup: Setup, machine: Machine) -> list[str]:
    """Host RAM short: the NVMe settings that would fit it (offload.device nvme with the engine's split, or more
    of the state on NVMe), with the disk space they need: in the setup's format if the engine runs it, else
    the first built format that fits; and the built format that needs the least disk, if another."""
    if setup.offload_device == "nvme" and setup.nvme_ratio is None:
        return []  # the engine's split already leaves in RAM all that fits
    ratios = [None] if setup.offload_device != "nvme" else \
        [r for r in (0.25, 0.5, 0.75, 1.0) if r > setup.nvme_ratio] + [None]
    found = []
    for name in (n for n in dict.fromkeys([setup.state_format, *STATE_FORMATS]) if STATE_FORMATS[n].built):
        for r in ratios:
            q = plan(shape, dataclasses.replace(setup, offload_device="nvme", nvme_ratio=r, state_format=name),
                     dataclasses.replace(machine, nvme_free_bytes=None))
            if q.verdicts["host"] in ("fits", "tight") and q.verdicts["gpu"] != "no":
                found.append((r, q))
                break
    least = min(found, key=lambda f: f[1].nvme) if found else None
    out = []
    for r, q in found[:1] + ([least] if least is not None and least is not found[0] else []):
        what = "offload.device nvme" if setup.offload_device != "nvme" else \
            f"offload.nvme_ratio {'null (auto)' if r is None else f'{r:g}'}"
        fmt = "" if q.setup.state_format == setup.state_format else f" (state format {q.setup.state_format})"
        out.append(f"{what}{fmt} with {nvme_need(q) / GiB:.0f} GiB free on a fast disk (offload.nvme_path): "
                   f"{q.nvme_params / 1e9:.2f} B params' state per rank in a {q.nvme / GiB:.1f} GiB file, read "
                   f"and written every step ({2 * q.nvme * setup.gpus_per_node / 1e9:.0f} GB per node per step)")
    return out


def _nvme_space(shape: ModelShape, setup: Setup, machine: Machine, p: Plan, ok) -> list[str]:
    """The NVMe state files do not fit the disk: more room, less on NVMe, smaller state, more nodes."""
    out = [f"{nvme_need(p) / GiB:.0f} GiB free at offload.nvme_path (free space there or point it at a larger "
           "drive)"]
    if setup.nvme_ratio is not None:
        for r in (0.75, 0.5, 0.25, 0.0):
            if r < setup.nvme_ratio and ok("host", "nvme", nvme_ratio=r):
                out.append(f"offload.nvme_ratio {r:g} (more of the state in RAM)")
                break
    fmt = host_format(setup)
    for name in STATE_FORMATS:
        other = host_format(setup, name)
        if other.built and other.second_set < fmt.second_set and ok("host", "nvme", state_format=name):
            q = plan(shape, dataclasses.replace(setup, state_format=name), machine)
            out.append(f"engine.offload.state_format {name} ({nvme_need(q) / GiB:.0f} GiB on NVMe per node)")
            break
    for k in (2, 4, 8, 16):
        if k > setup.nodes and ok("host", "nvme", nodes=k):
            out.append(f"{k} nodes (each node's disk then holds 1/{k} of the state)")
            break
    return out
