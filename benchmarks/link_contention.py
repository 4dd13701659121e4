"""Why the CPU optimizer runs slower inside a step than alone: the link's traffic and a busy GPU thread.

Session 11's benches printed the CPU kernel's rate within the timed steps at 35-60% of its rate alone
(1.44-2.35 against 3.96-4.16 G params/s, qwen3-4b on one H200). This times torch's fused CPU AdamW on 600 M
fp32 params (the host side's pass: read grad, master and moments, write them back), with 16 threads:
alone; while one thread keeps pinned copies running both ways (1 GiB up, 1 GiB down, two streams, as the
pipeline's gradient downloads and weight uploads do); while another thread keeps the GPU busy with bf16
matmuls and waits on it (as the training thread does); with both; alone again. Then the rate with copies
against alone at 8, 12 and 15 threads, and with copies and matmuls at 4 to 16 threads.

    python benchmarks/link_contention.py      # on a GPU box; prints one line per measurement

The "link" figure is the copies' GB/s (both ways together) during the AdamW pass.
"""

import threading
import time

import torch

if not torch.cuda.is_available():
    raise SystemExit("link_contention.py times pinned copies to and from a GPU: run it on a CUDA box")
torch.manual_seed(0)
K, n = 20, 30_000_000
N = K * n
ps = [torch.nn.Parameter(torch.randn(n)) for _ in range(K)]
for p in ps:
    p.grad = torch.randn(n) * 1e-3
opt = torch.optim.AdamW(ps, lr=1e-5, fused=True)
opt.step()


def adam(reps: int = 3) -> float:
    """The median time of REPS AdamW passes over all N params."""
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        opt.step()
        ts.append(time.perf_counter() - s)
    return sorted(ts)[len(ts) // 2]


stop = threading.Event()
moved = [0]
h_up = torch.empty(2**28, pin_memory=True)
h_dn = torch.empty(2**28, pin_memory=True)
d_up = torch.empty(2**28, device="cuda")
d_dn = torch.randn(2**28, device="cuda")
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()


def copies() -> None:
    """1 GiB up and 1 GiB down at once, on two streams, until stopped."""
    while not stop.is_set():
        with torch.cuda.stream(s1):
            d_up.copy_(h_up, non_blocking=True)
        with torch.cuda.stream(s2):
            h_dn.copy_(d_dn, non_blocking=True)
        s1.synchronize()
        s2.synchronize()
        moved[0] += 2 * 2**30


def matmuls() -> None:
    """20 bf16 8192^3 matmuls, then a wait on the GPU, until stopped."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    while not stop.is_set():
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def under(fns: list, settle: float) -> tuple[float, float]:
    """AdamW's median pass time while FNS run in threads, and the copies' GB/s during it."""
    stop.clear()
    moved[0] = 0
    threads = [threading.Thread(target=f) for f in fns]
    for t in threads:
        t.start()
    time.sleep(settle)
    t0, m0 = time.perf_counter(), moved[0]
    dt = adam()
    gbs = (moved[0] - m0) / (time.perf_counter() - t0) / 1e9
    stop.set()
    for t in threads:
        t.join()
    return dt, gbs


print(f"threads {torch.get_num_threads()}")
for name, fns in [("alone", []), ("with copies", [copies]), ("with matmuls", [matmuls]),
                  ("with both", [copies, matmuls]), ("alone again", [])]:
    dt, gbs = under(fns, 0.5)
    print(f"{name:14s} adam {dt:.3f} s = {N / dt / 1e9:.2f} G params/s; link {gbs:.1f} GB/s during it")
for nt in (8, 12, 15):
    torch.set_num_threads(nt)
    dt, _ = under([copies], 0.3)
    dta = adam()
    print(f"threads {nt}: with copies {N / dt / 1e9:.2f}, alone {N / dta / 1e9:.2f} G params/s")
print("with copies and matmuls, by thread count:")
for nt in (4, 6, 8, 10, 12, 14, 16):
    torch.set_num_threads(nt)
    dt, _ = under([copies, matmuls], 0.3)
    print(f"threads {nt}: {N / dt / 1e9:.2f} G params/s")
