"""Preemption: SIGTERM/SIGINT become a request that the training loop honours after the current step.

    with Preemption() as preempt:
        for step in ...:
            ...train one step...
            if preempt.should_stop(engine.device):   # every rank agrees (all-reduce MAX)
                save(engine, dir, f"step-{engine.global_step}", extra); break
    # exit 0

The handler only sets a flag (it runs between bytecodes of the main thread, possibly inside a
collective). A second signal of the same kind restores the previous handler's behaviour: press
Ctrl-C twice to stop without saving.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class Preemption:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested: int | None = None  # the signal number received
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        self.requested = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def should_stop(self, device: torch.device | None = None) -> bool:
        """Whether any rank was signalled; collective when distributed (call it on every rank each step)."""
        flag = self.requested is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([int(flag)], device=device or "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag
