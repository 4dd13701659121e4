"""Collective timeouts that become clear errors naming the rank, the world size and the phase.

    with guarded("grad-norm all-reduce", group):
        dist.all_reduce(total, group=group)
    total_sq = float(total)          # outside the block: the block already waited for the result

The limit is ``HEAVYLIFT_COLLECTIVE_TIMEOUT_S`` (default 600 s). ``init_dist`` gives it to
``init_process_group``. gloo collectives block and raise when it runs out; the guard turns that into a
:class:`HeavyliftError`. NCCL collectives return at once and a hang shows up later, in whatever next
waits for the GPU, and NCCL's watchdog then kills the process with a message that names no phase. So on
CUDA the guard ends by waiting (polling an event, no blocking sync) for the block's GPU work, with the
limit measured from the block's start, and raises the same error. ``init_dist`` gives NCCL a limit
``nccl_grace_s`` longer, so that a guarded phase reports first; collectives outside any guard (FSDP's
all-gathers and reduce-scatters) still end in NCCL's watchdog at that longer limit.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from heavylift.config.errors import HeavyliftError

DEFAULT_TIMEOUT_S = 600.0
ENV = "HEAVYLIFT_COLLECTIVE_TIMEOUT_S"

_TIMEOUT_WORDS = ("timed out", "timeout", "time out")
_LOST_WORDS = ("connection closed", "connection reset", "broken pipe", "connection refused", "ncclremoteerror",
               "ncclsystemerror", "unhandled system error", "communicator was aborted", "was aborted")


def collective_timeout_s() -> float:
    """``HEAVYLIFT_COLLECTIVE_TIMEOUT_S`` in seconds (default 600); a clear error if it is not a positive number."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise HeavyliftError(f"{ENV}={raw!r} is not allowed: use a positive number of seconds (default "
                             f"{DEFAULT_TIMEOUT_S:.0f})")
    return value


def nccl_grace_s(timeout_s: float) -> float:
    """How much longer than the guards' limit NCCL's own watchdog waits."""
    return max(30.0, 0.1 * timeout_s)


def _where(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group) if group is not None else dist.get_rank(), dist.get_world_size(group)
    return 0, 1


def _is_comm_failure(exc: BaseException) -> str | None:
    """'timeout', 'lost' or None (an ordinary error: left alone)."""
    dist_error = getattr(dist, "DistError", None)
    if not isinstance(exc, RuntimeError) and not (dist_error and isinstance(exc, dist_error)):
        return None
    text = str(exc).lower()
    if any(w in text for w in _TIMEOUT_WORDS):
        return "timeout"
    if (dist_error and isinstance(exc, dist_error)) or any(w in text for w in _LOST_WORDS):
        return "lost"
    return None


def collective_error(phase: str, kind: str, elapsed_s: float, group=None, limit_s: float | None = None,
                     cause: BaseException | None = None) -> HeavyliftError:
    rank, world = _where(group)
    limit = collective_timeout_s() if limit_s is None else limit_s
    if kind == "timeout":
        what = (f"timed out after {elapsed_s:.0f} s in '{phase}' — another rank probably died or is stuck; "
                f"check its log (the limit is {ENV}={limit:g})")
    else:
        what = (f"lost contact with another rank after {elapsed_s:.0f} s in '{phase}' — another rank probably "
                "died; check its log for the first error")
    detail = ""
    if cause is not None and str(cause).strip():
        detail = f" [{type(cause).__name__}: {str(cause).strip().splitlines()[0][:200]}]"
    return HeavyliftError(f"rank {rank}/{world}: {what}{detail}")


@contextmanager
def guarded(phase: str, group=None, device: torch.device | None = None,
            timeout_s: float | None = None) -> Iterator[None]:
    """Run the collectives of one phase; a timeout or a lost peer becomes a :class:`HeavyliftError`.

    On CUDA (``device``, else the current device when CUDA is initialised) the block's GPU work is waited
    for at its end, within the limit. Other errors pass through unchanged.
    """
    start = time.monotonic()
    limit = collective_timeout_s() if timeout_s is None else timeout_s
    try:
        yield
        if _world(group) > 1:
            _wait_gpu(phase, group, device, start, limit)
    except HeavyliftError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised unchanged if ordinary
        kind = _is_comm_failure(exc)
        if kind is None:
            raise
        raise collective_error(phase, kind, time.monotonic() - start, group, limit, exc) from exc


def _world(group) -> int:
    return _where(group)[1]


def _wait_gpu(phase: str, group, device: torch.device | None, start: float, limit: float) -> None:
    if device is not None and device.type != "cuda":
        return
    if device is None and not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    spins = 0
    while not event.query():
        if time.monotonic() - start > limit:
            raise collective_error(phase, "timeout", time.monotonic() - start, group, limit)
        spins += 1
        time.sleep(0 if spins < 200 else 2e-4)
