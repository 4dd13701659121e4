"""Assemble one benchmark run into the committed JSON and a markdown table (pure; unit-tested)."""

from __future__ import annotations

SYSTEMS = ("heavylift", "deepspeed-zero3-offload", "deepspeed-superoffload", "fsdp2-offload")


def combine_ranks(lines: list[dict]) -> dict:
    """One heavylift step record from every rank's (same keys): tokens/s summed, TFLOPS the mean per GPU, the
    step and each floor part the slowest rank's (the parts are measured on all ranks at once), peak GPU
    memory the largest, host RSS summed (the node's), the CPU kernel's rate in the steps and alone the
    slowest rank's (each rank's host params over its own time); the rest is rank 0's."""
    if len(lines) == 1:
        return {**lines[0], "gpus": 1}
    n = len(lines)
    floor = {k: None if any(r["floor"][k] is None for r in lines) else max(r["floor"][k] for r in lines)
             for k in lines[0]["floor"]}  # None: not measured (step benchmark --floor 0)
    out = {**lines[0], "gpus": n, "floor": floor,
           "step_s": max(r["step_s"] for r in lines),
           "tokens_per_s": round(sum(r["tokens_per_s"] for r in lines), 1),
           "tflops": round(sum(r["tflops"] for r in lines) / n, 1),
           "peak_gpu_gib": max(r["peak_gpu_gib"] for r in lines),
           "host_rss_gib": round(sum(r["host_rss_gib"] for r in lines), 2),
           "forward_wait_s": max(r["forward_wait_s"] for r in lines),
           **{k: max(r[k] for r in lines) for k in ("fwd_bwd_in_step_s", "boundary_step_s") if k in lines[0]}}
    for key, rates in (("cpu_params_per_s_in_steps", [r.get("cpu_params_per_s_in_steps") for r in lines]),
                       ("cpu_params_per_s_alone", [_cpu_rate_alone(r) for r in lines])):
        if all(x is not None for x in rates):  # the slowest rank's CPU kernel
            out[key] = min(rates)
    out["step_over_floor"] = round(out["step_s"] / floor["floor_s"], 3) if floor["floor_s"] else None
    return out


def _cpu_rate_alone(step: dict) -> float | None:
    """One record's host params over its floor's CPU optimizer time; None where either is missing."""
    cpu_s = step.get("floor", {}).get("cpu_optimizer_s")
    return step["host_params"] / cpu_s if step.get("host_params") and cpu_s else None


def combine_peer_ranks(lines: list[dict]) -> dict:
    """A peer's entry from the harness's JSON line of every rank (each counts its own tokens)."""
    n = len(lines)
    return {"step_s": max(r["step_s"] for r in lines), "tokens_per_s": round(sum(r["tokens_per_s"] for r in lines), 1),
            "tflops": round(sum(r["model_TFLOPS"] for r in lines) / n, 1),
            "peak_gpu_gib": max(r["peak_gpu_GiB"] for r in lines),
            "host_gib": round(sum(r["host_maxrss_GiB"] for r in lines), 2)}


def heavylift_entry(step: dict) -> dict:
    return {"step_s": step["step_s"], "tokens_per_s": step["tokens_per_s"], "tflops": step["tflops"],
            "peak_gpu_gib": step["peak_gpu_gib"], "host_gib": step["host_rss_gib"]}


def ceilings_floor_s(ceilings: dict, step: dict, tokens: int, gpus: int = 1) -> dict:
    """The floor the ceilings alone imply: matmul-rate GPU time (8N FLOPs/token with recompute, ``tokens``
    over all ``gpus``), the native kernel's CPU rate over every rank's host parameters (the ranks of a node
    share its memory bandwidth), fp32 both ways at one GPU's duplex link rate. The ceilings are one GPU's."""
    gpu = 8 * step["params"] * tokens / (gpus * ceilings["matmul_tflops"] * 1e12)
    rates = ceilings["cpu_adamw_params_per_s"]
    cpu = gpus * step["host_params"] / max(rates.get("native_out_of_place", rates["torch_fused"]), 1.0)
    link = 8 * step["host_params"] / (ceilings["both_gbs"] * 1e9)
    return {"gpu_s": gpu, "cpu_s": cpu, "link_s": link, "floor_s": max(gpu, cpu, link)}


def assemble(case: dict, card: str, commit: str, date: str, ceilings: dict, step: dict,
             peers: dict[str, dict | None], notes: dict[str, str], scaling: dict[int, dict] | None = None) -> dict:
    """``scaling``: heavylift's step record at each GPU count run (weak scaling: the same tokens per GPU)."""
    systems = {"heavylift": heavylift_entry(step), **{k: peers.get(k) for k in SYSTEMS[1:]}}
    peak = ceilings.get("matmul_tflops")
    for entry in systems.values():
        if entry is not None:
            if entry["tflops"] is None:  # a partial peer run: the same work in its measured time
                entry["tflops"] = step["tflops"] * step["step_s"] / entry["step_s"]
            entry["mfu"] = entry["tflops"] / peak if peak else None
    ran = [v["tokens_per_s"] for k, v in systems.items() if k != "heavylift" and v is not None]
    tokens = case["seq"] * case["micro_batch"] * case["accumulation"] * case["gpus"]
    return {
        "case": case, "card": card, "commit": commit, "date": date, "ceilings": ceilings,
        "floor_s": step["floor"]["floor_s"], "floor_parts_s": step["floor"],
        "ceilings_floor": ceilings_floor_s(ceilings, step, tokens, case["gpus"]), "systems": systems,
        "heavylift": {"step_over_floor": step["step_s"] / floor_s if (floor_s := step["floor"]["floor_s"]) else None,
                      "over_best_peer": step["tokens_per_s"] / max(ran) if ran else None,
                      "forward_wait_s": step["forward_wait_s"], "speculation": step.get("speculation"),
                      "fwd_bwd_in_step_s": step.get("fwd_bwd_in_step_s"), "boundary_step_s": step.get("boundary_step_s"),
                      "tail_buckets": step["tail_buckets"], "buckets": step["buckets"],
                      "blocks_recomputing": step.get("blocks_recomputing"), "placement": step.get("placement", []),
                      "compile": step.get("compile"), "host_rss_now_gib": step.get("host_rss_now_gib"),
                      "step_times": step.get("step_times"), "alloc_retries": step.get("alloc_retries"),
                      "cpu_params_per_s_in_steps": step.get("cpu_params_per_s_in_steps"),
                      "cpu_params_per_s_alone": step.get("cpu_params_per_s_alone", _cpu_rate_alone(step))},
        "notes": notes,
        "weak_scaling": weak_scaling(scaling) if scaling and len(scaling) > 1 else None,
    }


def weak_scaling(by_gpus: dict[int, dict]) -> dict:
    """tokens/s at each GPU count and its efficiency against the fewest GPUs run, scaled linearly."""
    base = min(by_gpus)
    per_gpu = by_gpus[base]["tokens_per_s"] / base
    return {str(n): {"tokens_per_s": r["tokens_per_s"], "efficiency": round(r["tokens_per_s"] / (n * per_gpu), 3)}
            for n, r in sorted(by_gpus.items())}


def markdown(result: dict) -> str:
    c = result["case"]
    lines = [f"# {c['shape']}, seq {c['seq']} x {c['micro_batch']} x accum {c['accumulation']}, "
             f"{c['gpus']} GPU(s), clip {c['clip']}, state {c['state_format']}",
             "", f"card: {result['card']} · commit {result['commit']} · {result['date']}", *allocator(c), "",
             "| system | s/step | tokens/s | model TFLOPS per GPU | MFU | peak GPU GiB | host GiB |", "|---|---|---|---|---|---|---|"]
    for name, e in result["systems"].items():
        if e is None:
            lines.append(f"| {name} | - | - | - | - | - | - |  ({result['notes'].get(name, 'not run')})")
            continue
        mfu = f"{e['mfu']:.1%}" if e.get("mfu") is not None else "-"
        gib = [f"{e[k]:.1f}" if e.get(k) is not None else "-" for k in ("peak_gpu_gib", "host_gib")]
        note = f"  ({result['notes'][name]})" if result["notes"].get(name) else ""
        lines.append(f"| {name} | {e['step_s']:.3f} | {e['tokens_per_s']:,.0f} | {e['tflops']:.0f} | {mfu} | "
                     f"{gib[0]} | {gib[1]} |{note}")
    h, f = result["heavylift"], result["floor_parts_s"]
    best = f"{h['over_best_peer']:.2f}x the best peer's tokens/s" if h["over_best_peer"] else "no peer ran"
    floor = (f"step / floor = {h['step_over_floor']:.2f} (floor {result['floor_s']:.3f} s = max(fwd+bwd "
             f"{f['fwd_bwd_s']:.3f}, CPU optimizer {f['cpu_optimizer_s']:.3f}, link {f['link_s']:.3f}), each measured alone)"
             if result["floor_s"] else "floor not measured")
    lines += ["", f"heavylift: {best}; {floor}; exposed optimizer wait {h['forward_wait_s']:.3f} s; GPU tail "
              f"{h['tail_buckets']}/{h['buckets']} buckets.", *in_step(h),
              f"ceilings floor (matmul rate, kernel rate, duplex link): {result['ceilings_floor']['floor_s']:.3f} s."]
    if h.get("placement"):
        lines += ["", f"heavylift placement (compile {h.get('compile')}, {h.get('blocks_recomputing')} blocks recompute, "
                  f"host RSS after the steps {h.get('host_rss_now_gib')} GiB):"] + [f"- {m}" for m in h["placement"]]
    if result.get("weak_scaling"):
        lines += ["", "weak scaling (heavylift, same tokens per GPU): " + "; ".join(
            f"{n} GPU(s) {w['tokens_per_s']:,.0f} tokens/s ({w['efficiency']:.0%} of linear)"
            for n, w in result["weak_scaling"].items())]
    return "\n".join(lines) + "\n"


def allocator(case: dict) -> list[str]:
    """The CUDA allocator's setting every system ran with (the bench's processes share its environment)."""
    if "cuda_alloc_conf" not in case:  # a record from before the bench wrote it
        return []
    given = case["cuda_alloc_conf"]
    return [f"CUDA allocator, every system: {given[0]}={given[1]}" if given else "CUDA allocator, every system: torch's default"]


def in_step(h: dict) -> list[str]:
    """Where the step's time went (records from before these fields: nothing)."""
    if h.get("fwd_bwd_in_step_s") is None:
        return []
    cpu = h.get("cpu_params_per_s_in_steps")
    alone = h.get("cpu_params_per_s_alone")
    rates = ([f"CPU kernel {cpu / 1e9:.2f} G params/s in the timed steps"
              + (f", {alone / 1e9:.2f} alone (the floor's CPU optimizer)." if alone else ".")] if cpu else [])
    return rates + [f"within the step: forward+backward {h['fwd_bwd_in_step_s']:.3f} s on the compute stream (each forward's "
            f"start to its backward's end, waits included), the window's last engine.step() {h['boundary_step_s']:.3f} s "
            "on the host."] + ([f"timed steps {h['step_times']} s (the median is the step), allocator retries "
                               f"{h['alloc_retries']}."] if h.get("step_times") else [])
