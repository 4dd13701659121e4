"""The planner's report: the tiers, the verdicts, what would fit, the state formats, the step-time floor."""

from __future__ import annotations

import dataclasses

from heavylift.memory.checks import nvme_need
from heavylift.memory.constants import FP32_ADAMW_TRAFFIC, LINK_DUPLEX, STATE_FORMATS, GiB
from heavylift.memory.plan import Machine, Plan, Rates, host_format, slot_of
from heavylift.optim import grad_slot
from heavylift.optim.formats import FORMATS


def render(p: Plan, machine: Machine, rates: Rates | None) -> str:
    s, sh = p.setup, p.shape
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    lines = [f"heavylift estimate: {sh.name}, {sh.params / 1e9:.2f} B params ({sh.layers} blocks, hidden {sh.hidden}, "
             f"vocab {sh.vocab})",
             f"  {s.nodes} node(s) x {s.gpus_per_node} GPU(s) = {s.world} rank(s); seq {s.seq}, micro-batch {s.mbs}, "
             f"grad accum {s.accum} = {s.tokens_per_step:,} tokens/step; activation checkpointing "
             f"{'on' if s.activation_checkpointing else 'off'}; state {s.state_format}; "
             f"GPU tail {p.tail_params / max(p.tail_params + p.host_params, 1):.0%} of params",
             format_line(s.state_format, slot_of(s)),
             "", f"{'tier / item (per rank)':52s}{'bytes':>13s}"]
    phase = max(p.gpu_phases, key=p.gpu_phases.get)
    lines.append(f"GPU  (peak in the {phase} phase)")
    for k, b in p.gpu.items():
        lines.append(f"  {k:50s}{g(b)}")
    lines.append(f"  {'peak allocated':50s}{g(p.gpu_peak)}")
    lines.append(f"  {'(other phase: ' + ', '.join(f'{n} {b / GiB:.1f} GiB' for n, b in p.gpu_phases.items() if n != phase) + ')':50s}")
    if p.gpu_settled:
        lines.append(f"  {'after the automatic placement (step 4)':50s}{g(p.gpu_settled)}")
    lines.append("host")
    for k, b in p.host.items():
        lines.append(f"  {k:50s}{g(b)}")
    lines.append(f"  {'peak per rank':50s}{g(p.host_peak_rank)}")
    lines.append(f"  {f'peak per node ({s.gpus_per_node} rank(s))':50s}{g(p.host_peak_node)}")
    lines += _nvme_rows(p, g)
    lines.append("")
    have_gpu = "unknown" if machine.gpu_usable is None else f"{machine.gpu_usable / GiB:.1f} GiB usable"
    have_host = "unknown" if machine.host_available_bytes is None else \
        f"{machine.host_available_bytes / GiB:.1f} GiB available"
    have_disk = "unknown" if machine.nvme_free_bytes is None else f"{machine.nvme_free_bytes / GiB:.1f} GiB free" \
        + (f" at {machine.nvme_path}" if machine.nvme_path else "")
    lines.append(f"fits: GPU {p.verdicts['gpu']} ({have_gpu}); host {p.verdicts['host']} ({have_host})"
                 + (f"; pinned {p.verdicts['pinned']}" if "pinned" in p.verdicts else "")
                 + (f"; NVMe {p.verdicts['nvme']} ({have_disk})" if "nvme" in p.verdicts else ""))
    for r in p.reasons:
        lines.append(f"  {r}")
    if p.suggestions:
        lines.append("to fit:")
        lines.extend(f"  - {x}" for x in p.suggestions)
    for n in p.notes:
        lines.append(f"note: {n}")
    if p.formats:
        from heavylift.memory.formats import render_options
        lines += ["", *render_options(p.formats, *p.format_choice)]
    if rates is not None and p.times:
        t, fmt = p.times, host_format(s)
        lines += ["", "step-time floor (per optimizer step)",
                  f"  GPU  8PT/(NF) at {rates.gpu_tflops:.0f} TFLOP/s ({rates.sources[0]}){'':5s}{t['gpu']:8.3f} s"
                  if s.activation_checkpointing else
                  f"  GPU  6PT/(NF) at {rates.gpu_tflops:.0f} TFLOP/s ({rates.sources[0]}){'':5s}{t['gpu']:8.3f} s",
                  f"  CPU  AdamW {fmt.cpu_traffic:.0f} B/p of traffic at {FP32_ADAMW_TRAFFIC * rates.cpu_params_per_s / 1e9:.0f}"
                  f" GB/s/host (fp32 {rates.cpu_params_per_s / 1e9:.2f} G params/s, {rates.sources[1]})"
                  f" {t['cpu']:8.3f} s",
                  f"  link {fmt.grad:g} B/p down + {fmt.master:g} B/p up at {rates.link_gbs:.0f} GB/s ({rates.sources[2]})"
                  f" x{LINK_DUPLEX} duplex {t['link']:8.3f} s",
                  *([f"  NVMe state read + written once: {2 * p.nvme * s.gpus_per_node / 1e9:.1f} GB/node at "
                     f"{rates.nvme_gbs:.2f} GB/s ({rates.nvme_source}) {t['nvme']:8.3f} s"] if p.nvme else []),
                  f"  floor (overlapped: max) {t['floor']:.3f} s = {s.tokens_per_step / t['floor']:,.0f} tokens/s; "
                  f"serial sum {t['serial']:.3f} s"]
    return "\n".join(lines)


def _nvme_rows(p: Plan, g) -> list[str]:
    s = p.setup
    if s.offload_device != "nvme":
        return [f"NVMe{'':48s}{g(0)}"]
    ratio = "auto: what RAM does not hold" if s.nvme_ratio is None else f"offload.nvme_ratio {s.nvme_ratio:g}"
    return [f"NVMe  ({ratio}; {p.nvme_params / 1e9:.2f} of {p.host_params / 1e9:.2f} B host params)",
            f"  {'state file: master + moments (4 KiB-aligned)':50s}{g(p.nvme)}",
            f"  {f'per node ({s.gpus_per_node} rank(s), + disk margin)':50s}{g(nvme_need(p))}"]


def format_line(name: str, slot: str = "fp32") -> str:
    """Bytes per parameter of a state format with a ``slot`` gradient slot, as ``estimate`` and the startup
    plan print them."""
    g = grad_slot.slot_bytes(slot)
    if name not in FORMATS:  # planned, not built
        f = dataclasses.replace(STATE_FORMATS[name], grad=float(g))
        return (f"  state format {name}: {f.host:.2f} B/param on the host with the {slot} gradient slot "
                f"({f.pinned:g} pinned), {f.second_set:.2f} more while speculating; not built yet")
    f = FORMATS[name]
    return (f"  state format {name}: {f.host_bytes(g):.2f} B/param on the host with the {slot} gradient slot "
            f"({f.host_pinned_bytes(g):g} pinned), {f.back_bytes:.2f} more while speculating; GPU tail "
            f"{FORMATS[f.tail].state_bytes:.2f} B/param; uploads {f.upload_bytes:g} B/param; "
            f"{'exact AdamW' if f.exact else 'not exact AdamW (docs/state-formats.md)'}")
