"""Where a start's pinning time goes: zeroing host buffers, then page-locking them (cudaHostRegister).

The engine allocates each host bucket's buffers with ``torch.zeros`` and locks them one after another
(offload/pinned.py). With gpu_assist on, that is every host state buffer (84 GB for qwen3-4b at ratio
0.8), and session 7's starts took 78-86 s against 37-43 s before. This times, for TOTAL GiB cut into
buffers of BUF MiB: the zeroing alone, the locking alone (serially through torch's binding, and from
THREADS threads through the process's libcudart via ctypes, which drops the GIL), and the unlocking.

    python benchmarks/pin_speed.py --total-gib 16 --buf-mib 512 --threads 1,4,8

One JSON line per measurement on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def _libcudart() -> ctypes.CDLL:
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "libcudart.so" in line})
    if not paths:
        raise SystemExit("no libcudart loaded in this process (static runtime?)")
    return ctypes.CDLL(paths[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-gib", type=float, default=16.0)
    ap.add_argument("--buf-mib", type=int, default=512)
    ap.add_argument("--threads", default="1,4,8")
    a = ap.parse_args()
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    rt = _libcudart()
    rt.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    rt.cudaHostUnregister.argtypes = [ctypes.c_void_p]
    n_buf = max(1, int(a.total_gib * 1024 / a.buf_mib))
    numel = a.buf_mib * 2**20 // 4
    gib = n_buf * a.buf_mib / 1024

    def emit(what: str, seconds: float, threads: int = 1) -> None:
        print(json.dumps({"what": what, "gib": round(gib, 2), "buf_mib": a.buf_mib, "threads": threads,
                          "s": round(seconds, 3), "gib_per_s": round(gib / seconds, 2)}), flush=True)

    t0 = time.perf_counter()
    bufs = [torch.zeros(numel) for _ in range(n_buf)]
    emit("torch.zeros", time.perf_counter() - t0, torch.get_num_threads())

    t0 = time.perf_counter()
    for b in bufs:
        assert int(torch.cuda.cudart().cudaHostRegister(b.data_ptr(), numel * 4, 1)) == 0
    emit("register torch binding", time.perf_counter() - t0)
    t0 = time.perf_counter()
    for b in bufs:
        torch.cuda.cudart().cudaHostUnregister(b.data_ptr())
    emit("unregister", time.perf_counter() - t0)

    for k in (int(x) for x in a.threads.split(",")):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(k) as ex:
            errs = list(ex.map(lambda b: rt.cudaHostRegister(b.data_ptr(), numel * 4, 1), bufs))
        emit("register ctypes", time.perf_counter() - t0, k)
        assert not any(errs), errs
        t0 = time.perf_counter()
        with ThreadPoolExecutor(k) as ex:
            list(ex.map(lambda b: rt.cudaHostUnregister(b.data_ptr()), bufs))
        emit("unregister ctypes", time.perf_counter() - t0, k)

    t0 = time.perf_counter()
    fresh = [torch.empty(numel) for _ in range(n_buf)]
    with ThreadPoolExecutor(8) as ex:
        errs = list(ex.map(lambda b: rt.cudaHostRegister(b.data_ptr(), numel * 4, 1), fresh))
    emit("register untouched pages (8 threads)", time.perf_counter() - t0, 8)
    t0 = time.perf_counter()
    for b in fresh:
        b.zero_()
    emit("zero after register", time.perf_counter() - t0, torch.get_num_threads())
    t0 = time.perf_counter()
    pinned = torch.zeros(numel * n_buf, pin_memory=True)
    emit("torch pin_memory=True (one buffer)", time.perf_counter() - t0)
    del pinned


if __name__ == "__main__":
    main()
