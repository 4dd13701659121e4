"""Where per-step metrics go: a JSONL file and TensorBoard in ``out_dir``, written on rank 0 only."""

from __future__ import annotations

import json
import pathlib
import time

import torch


class MetricsLog:
    """``log(step, {...})`` appends one JSON line (with wall time) and one TensorBoard scalar per number, and
    hands ``echo`` (e.g. ``tqdm.write``) a one-line summary of it."""

    def __init__(self, out_dir: str | pathlib.Path, enabled: bool = True, tensorboard: bool = True,
                 echo=None):
        self.enabled, self.echo = enabled, echo
        self.path = pathlib.Path(out_dir) / "metrics.jsonl"
        self._file = self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float | int | str]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self._file.flush()
        if self.echo is not None:
            self.echo(describe(step, metrics))
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


# Dense bf16 tensor-core peaks (TFLOP/s per GPU, no sparsity), matched as substrings of the device name.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


_LINE = (  # (key, format): the order and form of the printed summary; absent keys are left out
    ("loss", "loss {:.4f}"), ("eval_loss", "eval loss {:.4f}"), ("eval_loss_before", "eval loss before {:.4f}"),
    ("eval_loss_after", "after {:.4f}"), ("lr", "lr {:.3g}"), ("grad_norm", "gnorm {:.3g}"),
    ("tokens_per_s", "{:,.0f} tok/s"), ("tflops", "{:.0f} TFLOPS/GPU"), ("mfu", "MFU {:.1%}"),
    ("forward_s", "fwd {:.3f} s"), ("backward_s", "bwd {:.3f} s"), ("optim_wait_s", "optim wait {:.3f} s"),
    ("link_gbs", "link {:.1f} GB/s"), ("gpu_peak_mem_gib", "GPU peak {:.1f} GiB"),
    ("host_rss_gib", "host {:.1f} GiB"), ("pinned_gib", "pinned {:.1f} GiB"),
    ("alloc_retries", "allocator retries {:d}"))


def describe(step: int, metrics: dict) -> str:
    """One line: ``step 12 | loss 4.1135 | lr 2.45e-06 | ... | host 2.2 GiB | pinned 40.6 GiB``."""
    parts = [fmt.format(metrics[k]) for k, fmt in _LINE if isinstance(metrics.get(k), (int, float))
             and not (k == "alloc_retries" and not metrics[k])]  # the allocator's retries: only when some
    if metrics.get("skipped"):
        parts.append("step skipped")
    return " | ".join([f"step {step}"] + parts)


def peak_tflops_for(device_name: str | None) -> float | None:
    """The table's bf16 dense peak for a CUDA device name (``torch.cuda.get_device_name``), or None."""
    for key, peak in PEAK_TFLOPS.items():
        if device_name and key in device_name.upper():
            return peak
    return None


def flops_metrics(tokens_per_s_per_gpu: float, n_params: int, n_layers: int, hidden: int, seq_len: int,
                  peak_tflops: float | None = None, recompute: bool | float = False) -> dict[str, float]:
    """Model TFLOP/s per GPU, hardware TFLOP/s per GPU and MFU (pure function; the PaLM appendix B counting).

    Model FLOPs per token (forward + backward = 3 x forward, causal attention counted in full, activation
    recompute not counted):

        model_flops = 6*N + 12*L*h*s

    with N the matmul parameters (the input embedding lookup does no FLOPs), L layers, h the hidden size and
    s the sequence (row) length. With activation recompute the hardware does one more forward per token:

        hardware_flops = 8*N + 16*L*h*s      (= model_flops without recompute)

    ``recompute`` may be the fraction of blocks that recompute (the automatic placement lets some keep
    their activations): the extra forward is counted for that share.

    ``tflops`` = model_flops * tokens/s per GPU / 1e12, ``hfu_tflops`` likewise with hardware_flops, and
    ``mfu`` = tflops / peak_tflops, present only when a peak is known (none on CPU).
    """
    model = 6 * n_params + 12 * n_layers * hidden * seq_len
    hardware = model + float(recompute) * (2 * n_params + 4 * n_layers * hidden * seq_len)
    out = {"tflops": model * tokens_per_s_per_gpu / 1e12, "hfu_tflops": hardware * tokens_per_s_per_gpu / 1e12}
    if peak_tflops:
        out["mfu"] = out["tflops"] / peak_tflops
    return out


def host_rss_bytes() -> int:
    """Resident set size of this process now (VmRSS in /proc/self/status), else its peak (ru_maxrss)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def pinned_bytes(buckets) -> int:
    """Bytes of page-locked host optimizer state: the pinned flat buffers of the host buckets (0 without CUDA)."""
    import torch
    if not torch.cuda.is_available():
        return 0
    return sum(t.numel() * t.element_size() for b in buckets for t in b.flats.values()
               if t.device.type == "cpu" and t.is_pinned())


class PhaseTimer:
    """Forward and backward seconds of one step's micro-batches: CUDA events on a GPU (read after the step,
    which has synchronized by then), the wall clock on CPU. ``mark()`` before each forward, after it, and
    after each backward."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks = cuda, []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def split(self) -> tuple[float, float]:
        """(forward s, backward s) summed over the micro-batches."""
        fwd = bwd = 0.0
        for start, mid, end in zip(self.marks[0::3], self.marks[1::3], self.marks[2::3]):
            if self.cuda:
                end.synchronize()
                fwd += start.elapsed_time(mid) / 1e3
                bwd += mid.elapsed_time(end) / 1e3
            else:
                fwd += mid - start
                bwd += end - mid
        return fwd, bwd
