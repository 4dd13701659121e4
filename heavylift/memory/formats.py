"""Which optimizer-state format fits: every format of ``STATE_FORMATS`` planned alike, the first that fits
chosen (the table is in order of preference, most exact first), and the reason in words."""

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
    verdict: str  # the host (and pinned) verdict: fits | tight | no | unknown
    built: bool
    exact: bool


def host_verdict(p: Plan) -> str:
    """The host tiers alone: the format does not change the GPU's (the GPU tail is fp32 in every format)."""
    tiers = [p.verdicts["host"]] + ([p.verdicts["pinned"]] if "pinned" in p.verdicts else [])
    for v in ("no", "unknown", "tight"):
        if v in tiers:
            return v
    return "fits"


def format_options(shape: ModelShape, setup: Setup, machine: Machine) -> list[FormatOption]:
    out = []
    for name in STATE_FORMATS:
        q = dataclasses.replace(setup, state_format=name)
        p, fmt = plan(shape, q, machine), host_format(q)
        grad = int(fmt.grad * p.host_params * setup.gpus_per_node)
        out.append(FormatOption(name, fmt.host, fmt.grad, p.host_peak_node, grad, host_verdict(p), fmt.built,
                                fmt.exact))
    return out


def choose(options: list[FormatOption], machine: Machine, setup: Setup) -> tuple[str, str]:
    """(format, why): among the formats the engine runs, the first whose host state fits, else the first that
    fits tightly (within the estimate's uncertainty); then the same among those not built yet; if none
    fits, the one with the fewest bytes, said so."""
    have = machine.host_available_bytes
    if have is None:
        return options[0].name, "host memory unknown: give --host-mem-gib to choose a state format"
    where = f"{setup.nodes} node(s) with {have / GiB:.0f} GiB"
    ordered = [o for o in options if o.built] + [o for o in options if not o.built]
    for pool in ([o for o in ordered if o.built], [o for o in ordered if not o.built]):
        for wanted in ("fits", "tight"):
            # "tight" is within the estimate's uncertainty either way; one whose estimate exceeds the RAM
            # is not offered as fitting
            pick = next((o for o in pool if o.verdict == wanted and o.host_node <= have), None)
            if pick is not None:
                before = "; ".join(f"{o.name} needs {o.host_node / GiB:.0f} GiB per node ({o.verdict})"
                                   for o in ordered[: ordered.index(pick)])
                fit = "fits" if wanted == "fits" else "fits tightly (within the estimate's uncertainty)"
                text = (f"{pick.name} {fit} on {where} ({pick.host_node / GiB:.0f} GiB per node, "
                        f"{pick.bytes_per_param:.2f} B/param{'' if pick.exact else '; not exact AdamW: docs/state-formats.md'})"
                        + ("" if pick.built else "; not built yet: offload.state_format does not accept it"))
                return pick.name, f"{before}; {text}" if before else text
    least = min(options, key=lambda o: o.host_node)
    return least.name, (f"no state format fits on {where}: the smallest, {least.name} ({least.bytes_per_param:.2f} "
                        f"B/param), needs {least.host_node / GiB:.0f} GiB per node "
                        f"({(least.host_node - have) / GiB:.0f} GiB over), of which "
                        f"{least.grad_node / GiB:.0f} GiB are the {least.grad_bytes:g} B/param "
                        "gradient slots every host bucket keeps until the step is validated; see 'to fit'")


def render_options(options: list[FormatOption], chosen: str, why: str) -> list[str]:
    lines = ["state formats (host bytes/param: master + moments + gradient slot (its bytes: 4 fp32, 2 bf16); "
             "per node: all its ranks' peak)"]
    width = max(len(o.name) for o in options) + 1
    for o in options:
        flags = ", ".join(x for x in ("exact" if o.exact else "", "" if o.built else "not built yet") if x)
        mark = "->" if o.name == chosen else "  "
        lines.append(f"{mark} {o.name:{width}s}{o.bytes_per_param:6.2f} B/param (slot {o.grad_bytes:g}) "
                     f"{o.host_node / GiB:9.1f} GiB/node  host {o.verdict:8s}{flags}")
    lines.append(f"  {why}")
    return lines
