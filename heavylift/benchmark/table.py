"""Assemble one benchmark run into the committed JSON and a markdown table (pure; unit-tested)."""

from __future__ import annotations

SYSTEMS = ("heavylift", "deepspeed-zero3-offload", "deepspeed-superoffload", "fsdp2-offload")


def heavylift_entry(step: dict) -> dict:
    return {"step_s": step["step_s"], "tokens_per_s": step["tokens_per_s"], "tflops": step["tflops"],
            "peak_gpu_gib": step["peak_gpu_gib"], "host_gib": step["host_rss_gib"]}


def ceilings_floor_s(ceilings: dict, step: dict, tokens: int) -> dict:
    """The floor the ceilings alone imply: matmul-rate GPU time (8N FLOPs/token with recompute), the
    native kernel's CPU rate over the host parameters, fp32 both ways at the duplex link rate."""
    gpu = 8 * step["params"] * tokens / (ceilings["matmul_tflops"] * 1e12)
    rates = ceilings["cpu_adamw_params_per_s"]
    cpu = step["host_params"] / max(rates.get("native_out_of_place", rates["torch_fused"]), 1.0)
    link = 8 * step["host_params"] / (ceilings["both_gbs"] * 1e9)
    return {"gpu_s": gpu, "cpu_s": cpu, "link_s": link, "floor_s": max(gpu, cpu, link)}


def assemble(case: dict, card: str, commit: str, date: str, ceilings: dict, step: dict,
             peers: dict[str, dict | None], notes: dict[str, str]) -> dict:
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
        "ceilings_floor": ceilings_floor_s(ceilings, step, tokens), "systems": systems,
        "heavylift": {"step_over_floor": step["step_s"] / step["floor"]["floor_s"],
                      "over_best_peer": step["tokens_per_s"] / max(ran) if ran else None,
                      "forward_wait_s": step["forward_wait_s"], "speculation": step.get("speculation"),
                      "tail_buckets": step["tail_buckets"], "buckets": step["buckets"],
                      "blocks_recomputing": step.get("blocks_recomputing"), "placement": step.get("placement", []),
                      "compile": step.get("compile"), "host_rss_now_gib": step.get("host_rss_now_gib")},
        "notes": notes,
    }


def markdown(result: dict) -> str:
    c = result["case"]
    lines = [f"# {c['shape']}, seq {c['seq']} x {c['micro_batch']} x accum {c['accumulation']}, "
             f"{c['gpus']} GPU(s), clip {c['clip']}, state {c['state_format']}",
             "", f"card: {result['card']} · commit {result['commit']} · {result['date']}", "",
             "| system | s/step | tokens/s | model TFLOPS | MFU | peak GPU GiB | host GiB |", "|---|---|---|---|---|---|---|"]
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
    lines += ["", f"heavylift: {best}; step / floor = {h['step_over_floor']:.2f} (floor {result['floor_s']:.3f} s = "
              f"max(fwd+bwd {f['fwd_bwd_s']:.3f}, CPU optimizer {f['cpu_optimizer_s']:.3f}, link {f['link_s']:.3f}), "
              f"each measured alone); exposed optimizer wait {h['forward_wait_s']:.3f} s; GPU tail "
              f"{h['tail_buckets']}/{h['buckets']} buckets.",
              f"ceilings floor (matmul rate, kernel rate, duplex link): {result['ceilings_floor']['floor_s']:.3f} s."]
    if h.get("placement"):
        lines += ["", f"heavylift placement (compile {h.get('compile')}, {h.get('blocks_recomputing')} blocks recompute, "
                  f"host RSS after the steps {h.get('host_rss_now_gib')} GiB):"] + [f"- {m}" for m in h["placement"]]
    return "\n".join(lines) + "\n"
