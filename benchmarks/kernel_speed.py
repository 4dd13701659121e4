"""CPU AdamW kernel throughput on this machine (no GPU needed), one JSON line:
torch's fused kernel in place, heavylift's native kernel in place and out of place (the speculative
step), a snapshot copy of (p, m, v) (what speculation costs with torch's kernel), and every compact
state format's kernel out of place (bf16 moments, int8 moments, bf16 master, bf16 master + int8 moments).

    python benchmarks/kernel_speed.py [--params 32000000] [--reps 5] [--machine "2-core dev box"]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import torch

from heavylift.optim import native
from heavylift.optim.adamw import AdamWHyper, adamw_step_
from heavylift.optim.compact import split_bf16
from heavylift.optim.formats import FORMATS, native_step
from heavylift.optim.quant import quantize_m, quantize_r


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
    ap.add_argument("--machine", default="", help="a name for the machine, stored with the result")
    ap.add_argument("--row-len", type=int, default=4096, help="row length of the int8 blocks (a hidden size)")
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
    n8 = n - n % a.row_len
    mq, ms = quantize_m(m[:n8], a.row_len)
    rq, rs = quantize_r(v[:n8].sqrt(), a.row_len)
    int8 = dict(master=p[:n8], exp_avg=mq, exp_avg_scale=ms, exp_avg_sq=rq, exp_avg_sq_scale=rs)
    int8_out = {key: torch.empty_like(t) for key, t in int8.items()}
    int8_out["master"] = po[:n8]
    hi, lo = split_bf16(p)
    bf16m = dict(master=hi, master_comp=lo, exp_avg=mb, exp_avg_sq=vb)
    bf16m_out = {key: torch.empty_like(t) for key, t in bf16m.items()}
    sr8 = dict(int8, master=hi[:n8])
    sr8_out = dict(int8_out, master=torch.empty_like(hi[:n8]))
    for name, fmt, src, dst, size in (("int8_moments", "int8-moments", int8, int8_out, n8),
                                      ("bf16_master", "bf16-master", bf16m, bf16m_out, n),
                                      ("bf16_master_int8", "bf16-master-int8", sr8, sr8_out, n8)):
        step = (lambda f, s_, d_, m_: lambda: native_step(k, f, s_, d_, g[:m_], hp, 5, 1.0, a.row_len, (7, 0)))(
            FORMATS[fmt], src, dst, size)
        out["G_params_per_s"][f"native_{name}_out_of_place"] = rate(step, size, a.reps)
        inplace = (lambda f, s_, m_: lambda: native_step(k, f, s_, s_, g[:m_], hp, 5, 1.0, a.row_len, (7, 0)))(
            FORMATS[fmt], dst, size)
        out["G_params_per_s"][f"native_{name}_in_place"] = rate(inplace, size, a.reps)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out.update(params=n, threads=torch.get_num_threads(), cpu=cpu, machine=platform.machine(), commit=commit,
               torch=torch.__version__, host=a.machine, int8_row_len=a.row_len,
               load_avg_1min=os.getloadavg()[0])  # other jobs on the machine share its cores
    print(json.dumps(out))


if __name__ == "__main__":
    main()
