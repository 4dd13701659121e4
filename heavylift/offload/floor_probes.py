"""The benchmark's floor parts that the pipeline measures on its own buckets, each alone (nothing else
running, the state left as it was): one CPU optimizer pass over the host buckets, and one disk pass over
the NVMe buckets. A mixin of :class:`~heavylift.offload.pipeline.OffloadPipeline`."""

from __future__ import annotations

import threading
import time

import torch


class FloorProbes:
    def time_host_pass(self) -> float:
        """Seconds of one AdamW pass over every host bucket, the way the worker runs it (its thread count,
        its kernel), with nothing else running; the state is left as it was. For the benchmark's floor."""
        self.wait_all()
        host = [b for b in self.buckets if b.on_host and not b.nvme]  # NVMe: their floor term is the disk
        if not host:  # the placement moved every bucket to the GPU tail: no CPU optimizer work
            return 0.0
        slots = [s for b in host for s in b.slots]
        self._stepper.hypers = {g: self._hypers(g) for g in self._groups}
        out: dict[str, float] = {}

        @torch.no_grad()
        def run() -> None:
            torch.set_num_threads(self._cpu_threads)
            if self._double_buffered:  # writes the back buffers only: the state is untouched
                t = time.perf_counter()
                self._stepper.native_step(host[0].fmt, slots, 1.0, into_back=True)
                out["s"] = time.perf_counter() - t
                return
            # one bucket's state saved at a time (the whole host state's copy would double its RAM: a
            # 20 B int8-moments run was killed there); only the steps are timed
            total = 0.0
            for b in host:
                saved = [({k: v.clone() for k, v in s.state.items()}, s.step.clone()) for s in b.slots]
                t = time.perf_counter()
                self._stepper.step_slots(b, b.slots, 1.0, 1.0)
                total += time.perf_counter() - t
                for s, (state, st) in zip(b.slots, saved):
                    for k, v in state.items():
                        s.state[k].copy_(v)
                    s.step.copy_(st)
            out["s"] = total  # only a pass that ran to its end gives a figure

        th = threading.Thread(target=run)
        th.start()
        th.join()
        if "s" not in out:
            raise RuntimeError("the timed CPU optimizer pass failed (its thread's traceback is above)")
        return out["s"]

    def time_disk_pass(self) -> float:
        """Seconds to read every NVMe bucket's state through the ring and write it back unchanged, with its
        read-ahead and write-behind and nothing else running: the disk's term of the benchmark's floor."""
        self.wait_all()
        if self._ring is None:
            return 0.0
        t = time.perf_counter()
        self._ring.begin()
        for b in self._ring.step_order:
            self._ring.acquire(b)
            self._ring.release(b, dirty=True)
        self._ring.drain()
        return time.perf_counter() - t
