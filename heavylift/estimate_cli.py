"""``heavylift estimate``: bytes per tier per rank, whether it fits, and the step-time floor.

    heavylift estimate --model PRESET|DIR [--gpus N] [--nodes K] [--seq S] [--mbs B] [--accum A]
                       [--tail-ratio r] [--no-ac] [--no-speculate] [--state-format auto|fp32|bf16-moments|...]
                       [--grad-slot auto|fp32|bf16]
                       [--gpu-mem-gib G] [--host-mem-gib H]
                       [--nvme PATH | --nvme-free-gib D] [--nvme-ratio R] [--nvme-buffers N] [--nvme-gbs B]
                       [--gpu-tflops F] [--cpu-params-per-s R] [--link-gbs W]

``--tail-ratio`` is the fraction of parameters whose optimizer state stays on the GPU (1 - engine.offload.ratio);
left out, the engine's automatic choice. ``--state-format auto`` (the default) plans with the first
format, most exact first, whose host state fits, and the output says why; every format is listed. ``--gpu-mem-gib``/``--host-mem-gib`` describe another machine
(per GPU; host RAM per node); without them this machine is measured. Rates not given are probed here.

``--nvme PATH`` plans ``offload.device nvme`` with ``offload.nvme_path`` PATH: the host buckets' state that RAM
does not hold (the engine's rule, or ``--nvme-ratio`` of it) goes in a state file per rank there; the verdict
is against PATH's free space and the floor gains the disk's time, from a 256 MiB write + read probe in PATH
unless ``--nvme-gbs`` states it. ``--nvme-free-gib`` describes another machine's disk (device nvme, no probe).
"""

from __future__ import annotations

import argparse
import dataclasses

from heavylift.config.errors import HeavyliftError
from heavylift.memory.constants import STATE_FORMATS


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage + message becomes one HeavyliftError line
        raise HeavyliftError(f"estimate: {message}")


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="heavylift estimate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="'default', a preset name, or an HF model directory")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mbs", type=int, default=1, help="micro-batch per GPU")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--tail-ratio", type=float, default=None,
                   help="fraction of params with GPU optimizer state (1 - engine.offload.ratio); default: auto")
    p.add_argument("--no-ac", action="store_true", help="activation checkpointing off")
    p.add_argument("--save-attention", action="store_true", help="engine.save_attention: a recomputing block also "
                   "keeps its attention output (2 B x heads x head_dim per token and block)")
    p.add_argument("--no-compile", action="store_true", help="engine.compile off (eager blocks keep more "
                   "activations); default: compiled, as on a CUDA machine")
    p.add_argument("--no-speculate", action="store_true", help="engine.offload.speculate false (no snapshot)")
    p.add_argument("--no-pin", action="store_true", help="engine.offload.pin_memory false")
    p.add_argument("--state-format", default="auto",
                   help="host optimizer state format (offload.state_format; auto: the first that fits, of "
                        f"{', '.join(STATE_FORMATS)})")
    p.add_argument("--grad-slot", default="auto", choices=["auto", "fp32", "bf16"],
                   help="offload.grad_slot: the host gradient slot's dtype (auto: bf16 with bf16 compute or a "
                        "compact format, else fp32)")
    p.add_argument("--accumulate", default="device", choices=["device", "host"],
                   help="offload.accumulate: where grad_accum sums the host buckets' micro-batch gradients (host: "
                        "the card keeps only the GPU tail's)")
    p.add_argument("--loss-chunk-tokens", type=int, default=8192,
                   help="engine.loss_chunk_tokens (0: the model's own fp32-logits loss)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="compute dtype")
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="describe a machine: memory per GPU")
    p.add_argument("--host-mem-gib", type=float, default=None, help="describe a machine: host RAM per node")
    p.add_argument("--nvme", metavar="PATH", default="",
                   help="offload.device nvme with offload.nvme_path PATH (its free space is checked, its speed probed)")
    p.add_argument("--nvme-free-gib", type=float, default=None,
                   help="describe a machine: free GiB on its NVMe drive (implies offload.device nvme)")
    p.add_argument("--nvme-ratio", type=float, default=None,
                   help="offload.nvme_ratio: fraction of host-stepped params on NVMe (default: what RAM does not hold)")
    p.add_argument("--nvme-buffers", type=int, default=3, help="offload.nvme_buffers: buffer sets in the ring")
    p.add_argument("--gpu-assist", type=_share_or_auto, default="auto",
                   help="offload.gpu_assist: a share (> 0 pins every host state buffer: the pinned figure and "
                        "ulimit -l) or auto (the default: on where the state format allows and ulimit -l can pin "
                        "it, as heavylift train)")
    p.add_argument("--nvme-gbs", type=float, default=None,
                   help="the NVMe drive's read + write GB/s (default: a 256 MiB probe in --nvme PATH, else 2)")
    p.add_argument("--gpu-tflops", type=float, default=None, help="bf16 rate per GPU (default: probe/746)")
    p.add_argument("--cpu-params-per-s", type=float, default=None,
                   help="fused CPU AdamW rate of the host, params/s (default: a ~1 s probe here)")
    p.add_argument("--link-gbs", type=float, default=None, help="pinned host<->GPU GB/s per GPU (default: probe/50)")
    return p


def _share_or_auto(text: str) -> float | str:
    from heavylift.config.schema import share_or_auto

    try:
        return share_or_auto(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(argv: list[str]) -> int:
    from heavylift.memory import Setup, probe_rates, render, this_machine
    from heavylift.memory.preflight import estimate_assisted
    a = parser().parse_args(argv)
    for key in ("gpu_mem_gib", "host_mem_gib", "gpu_tflops", "cpu_params_per_s", "link_gbs", "nvme_free_gib",
                "nvme_gbs"):
        value = getattr(a, key)
        if value is not None and not value > 0:
            raise HeavyliftError(f"estimate: --{key.replace('_', '-')} must be > 0, not {value}")
    setup = Setup(gpus_per_node=a.gpus, nodes=a.nodes, seq=a.seq, mbs=a.mbs, accum=a.accum,
                  activation_checkpointing=not a.no_ac, compiled=not a.no_compile, state_format=a.state_format,
                  save_attention=a.save_attention,
                  speculate=not a.no_speculate, loss_chunk_tokens=a.loss_chunk_tokens,
                  tail_ratio=a.tail_ratio, pin=not a.no_pin, dtype_bytes=4 if a.dtype == "fp32" else 2,
                  compute_dtype=a.dtype, grad_slot=a.grad_slot, host_accumulate=a.accumulate == "host",
                  load_bytes=4 if a.model == "default" else 0,  # as heavylift train loads it
                  offload_device="nvme" if a.nvme or a.nvme_free_gib is not None else "cpu",
                  nvme_ratio=a.nvme_ratio, nvme_buffers=a.nvme_buffers,
                  gpu_assist=1.0 if a.gpu_assist == "auto" else a.gpu_assist)  # auto: on where a GPU steps the format
    from heavylift.memory import check_setup
    check_setup(setup)  # bad numbers fail before the model is read or anything is probed
    if a.nvme:
        from heavylift.config.errors import ConfigError
        from heavylift.offload.nvme import check_nvme_path
        try:
            check_nvme_path(a.nvme, 0)
        except ConfigError as e:
            raise HeavyliftError(f"estimate: --nvme {a.nvme}: use {e.allowed}") from None
    machine = this_machine(a.gpu_mem_gib, a.host_mem_gib, nvme_path=a.nvme, nvme_free_gib=a.nvme_free_gib)
    rates = probe_rates(a.gpu_tflops, a.cpu_params_per_s, a.link_gbs, nvme_gbs=a.nvme_gbs,
                        nvme_path=a.nvme if setup.offload_device == "nvme" else "")
    if a.gpu_assist == "auto" and not (machine.has_cuda or a.gpu_mem_gib is not None):
        setup = dataclasses.replace(setup, gpu_assist=0.0)  # a CPU run (no card here, none described): auto is off
    p = estimate_assisted(a.model, setup, machine, rates, auto=a.gpu_assist == "auto")
    print(render(p, machine, rates))
    return 0
