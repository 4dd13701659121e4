"""Which optimizer-state format fits: every format of ``STATE_FORMATS`` planned alike, the first that fits
chosen (the table is in order of preference, most exact first), and the reason in words. With offload.device
nvme a format that fits in RAM alone comes before one that needs the disk (every step then reads and writes
the NVMe share of the state)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from heavylift.memory.constants import STATE_FORMATS, GiB
from heavylift.memory.model import ModelShape
from heavylift.memory.plan import Machine, Plan, Setup, host_format, plan


@dataclass(frozen=True)
class FormatOption:
    name: str
    bytes_per_param: float  # host state incl. the gradient slot
    grad_bytes: float  # the gradient slot's share of it (2: bf16, 4: fp32)
    host_node: int  # peak host bytes per node with this format
    grad_node: int  # of which the gradient slots
    verdict: str  # the host (pinned, NVMe) verdict: fits | tight | no | unknown
    built: bool
    exact: bool
    nvme_node: int = 0  # state files per node on NVMe (offload.device nvme)
    ram: tuple[int, str] = (0, "")  # (host_node, verdict) with all the state in RAM (offload.device cpu)


def host_verdict(p: Plan) -> str:
    """The host tiers alone (RAM, pinned, NVMe): the format barely changes the GPU's."""
    tiers = [p.verdicts[t] for t in ("host", "pinned", "nvme") if t in p.verdicts]
    for v in ("no", "unknown", "tight"):
        if v in tiers:
            return v
    return "fits"


def format_options(shape: ModelShape, setup: Setup, machine: Machine) -> list[FormatOption]:
    out = []
    for name in STATE_FORMATS:
        q = dataclasses.replace(setup, state_format=name)
        p, fmt = plan(shape, q, machine), host_format(q)
        r = p if setup.offload_device == "cpu" else plan(shape, dataclasses.replace(q, offload_device="cpu",
                                                                                     nvme_ratio=None), machine)
        grad = int(fmt.grad * p.host_params * setup.gpus_per_node)
        out.append(FormatOption(name, fmt.host, fmt.grad, p.host_peak_node, grad, host_verdict(p), fmt.built,
                                fmt.exact, p.nvme * setup.gpus_per_node, (r.host_peak_node, host_verdict(r))))
    return out


def choose(options: list[FormatOption], machine: Machine, setup: Setup) -> tuple[str, str]:
    """(format, why): among the formats the engine runs, the first whose host state fits in RAM alone, else
    (offload.device nvme) the first that fits with the engine's split between RAM and NVMe, each first
    "fits" then "fits tightly" (within the estimate's uncertainty); then the same among those not built yet;
    if none fits, the one with the fewest bytes, said so."""
    have = machine.host_available_bytes
    if have is None:
        return options[0].name, "host memory unknown: give --host-mem-gib to choose a state format"
    where = f"{setup.nodes} node(s) with {have / GiB:.0f} GiB"
    ordered = [o for o in options if o.built] + [o for o in options if not o.built]
    passes = [(False, "fits"), (False, "tight")]
    if setup.offload_device == "nvme":
        passes += [(True, "fits"), (True, "tight")]
    for pool in ([o for o in ordered if o.built], [o for o in ordered if not o.built]):
        for on_disk, wanted in passes:
            # "tight" is within the estimate's uncertainty either way; one whose estimate exceeds the RAM
            # is not offered as fitting
            pick = next((o for o in pool if _state(o, on_disk)[1] == wanted and _state(o, on_disk)[0] <= have), None)
            if pick is not None:
                return pick.name, _why(pick, ordered, where, wanted, on_disk, setup.offload_device == "nvme")
    least = min(options, key=lambda o: o.host_node)
    return least.name, (f"no state format fits on {where}: the smallest, {least.name} ({least.bytes_per_param:.2f} "
                        f"B/param), needs {least.host_node / GiB:.0f} GiB per node "
                        f"({(least.host_node - have) / GiB:.0f} GiB over), of which "
                        f"{least.grad_node / GiB:.0f} GiB are the {least.grad_bytes:g} B/param "
                        "gradient slots every host bucket keeps until the step is validated; see 'to fit'")


def _state(o: FormatOption, on_disk: bool) -> tuple[int, str]:
    """(host bytes per node, verdict) of ``o`` in RAM alone, or with the engine's NVMe split."""
    return (o.host_node, o.verdict) if on_disk else o.ram


def _needs(o: FormatOption, on_disk: bool) -> str:
    return f"{_state(o, on_disk)[0] / GiB:.0f} GiB" + (f" + {o.nvme_node / GiB:.0f} GiB NVMe" if on_disk else "")


def _why(pick: FormatOption, ordered: list[FormatOption], where: str, wanted: str, on_disk: bool, nvme: bool) -> str:
    before = "; ".join(f"{o.name} needs {_needs(o, on_disk)} per node ({_state(o, on_disk)[1]})"
                       for o in ordered[: ordered.index(pick)])
    fit = "fits" if wanted == "fits" else "fits tightly (within the estimate's uncertainty)"
    text = (f"{pick.name} {fit}{' in RAM alone' if nvme and not on_disk else ''} on {where} "
            f"({_needs(pick, on_disk)} per node, "
            f"{pick.bytes_per_param:.2f} B/param{'' if pick.exact else '; not exact AdamW: docs/state-formats.md'})"
            + ("" if pick.built else "; not built yet: offload.state_format does not accept it"))
    if on_disk:
        text = (f"no {'built ' if pick.built else ''}state format fits in RAM alone; with NVMe {text}; every step "
                "reads and writes the NVMe share once (see the floor)")
    elif nvme and pick.nvme_node:
        text += (f"; offload.device cpu then (with nvme the engine's split, which keeps 15% of MemAvailable free, "
                 f"still puts {pick.nvme_node / GiB:.0f} GiB on the disk)")
    return f"{before}; {text}" if before else text


def render_options(options: list[FormatOption], chosen: str, why: str) -> list[str]:
    lines = ["state formats (host bytes/param: master + moments + gradient slot (its bytes: 4 fp32, 2 bf16); "
             "per node: all its ranks' peak)"]
    width = max(len(o.name) for o in options) + 1
    nvme = any(o.nvme_node for o in options)
    for o in options:
        flags = ", ".join(x for x in ("exact" if o.exact else "", "" if o.built else "not built yet") if x)
        mark = "->" if o.name == chosen else "  "
        disk = f"{o.nvme_node / GiB:7.1f} GiB NVMe  host+NVMe " if nvme else "host "
        alone = f"(RAM alone {o.ram[0] / GiB:.0f} GiB: {o.ram[1]}) " if nvme else ""
        lines.append(f"{mark} {o.name:{width}s}{o.bytes_per_param:6.2f} B/param (slot {o.grad_bytes:g}) "
                     f"{o.host_node / GiB:9.1f} GiB/node  {disk}{o.verdict:8s}{alone}{flags}")
    lines.append(f"  {why}")
    return lines
