"""Where per-step metrics go: a JSONL file and TensorBoard in ``out_dir``, written on rank 0 only."""

from __future__ import annotations

import json
import pathlib
import time


class MetricsLog:
    """``log(step, {...})`` appends one JSON line (with wall time) and one TensorBoard scalar per number."""

    def __init__(self, out_dir: str | pathlib.Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
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
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
