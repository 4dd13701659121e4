"""CPU AdamW kernel throughput on this machine (no GPU needed), one JSON line:
torch's fused kernel in place, heavylift's native kernel in place and out of place (the speculative
step), a snapshot copy of (p, m, v) (what speculation costs with torch's kernel), and bf16 moments.

    python benchmarks/kernel_speed.py [--params 32000000] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import torch

from heavylift.optim import native
from heavylift.optim.adamw import AdamWHyper, adamw_step_


def rate(fn, n: int, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return n * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=32_000_000)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    n, k = a.params, native.load()
    torch.manual_seed(0)
    p, m, v, g = torch.randn(n) * 0.02, torch.randn(n) * 1e-3, torch.rand(n) * 1e-6, torch.randn(n) * 1e-3
    po, mo, vo = torch.empty_like(p), torch.empty_like(m), torch.empty_like(v)
    hp, steps = AdamWHyper(1e-3, 0.9, 0.999, 1e-8, 0.1), [torch.tensor(4.0)]
    args = (1e-3, 0.9, 0.999, 1e-8, 0.1, 5, 1.0)
    out = {"G_params_per_s": {
        "torch_fused_in_place": rate(lambda: adamw_step_([p], [g], [m], [v], steps, hp), n, a.reps),
        "native_out_of_place": rate(lambda: k.adamw_step(p, m, v, g, po, mo, vo, *args), n, a.reps),
        "native_in_place": rate(lambda: k.adamw_step(po, mo, vo, g, po, mo, vo, *args), n, a.reps),
        "snapshot_copy_p_m_v": rate(lambda: (po.copy_(p), mo.copy_(m), vo.copy_(v)), n, a.reps),
    }}
    mb, vb = m.bfloat16(), v.bfloat16()
    mbo, vbo = torch.empty_like(mb), torch.empty_like(vb)
    out["G_params_per_s"]["native_bf16_moments_out_of_place"] = rate(
        lambda: k.adamw_step_bf16_moments(p, mb, vb, g, po, mbo, vbo, *args), n, a.reps)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out.update(params=n, threads=torch.get_num_threads(), cpu=cpu, machine=platform.machine(), commit=commit,
               torch=torch.__version__)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
