"""Page-locked host buffers of exactly the size asked for.

``torch.empty(..., pin_memory=True)`` goes through the CUDA caching host allocator, which rounds every
block up to a power of two: a 364 MB bucket buffer takes 512 MiB, up to half the pinned RAM wasted.
So the store allocates ordinary memory and page-locks it with ``cudaHostRegister`` (what the driver
does for pinned memory anyway), and unregisters it before the memory is freed.
"""

from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger("heavylift")
_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process


def pinned_zeros(n: int, dtype: torch.dtype = torch.float32, fallback: bool = True) -> torch.Tensor:
    """A zeroed CPU tensor whose pages are locked for DMA. Where the driver refuses: torch's pinned allocator
    (up to twice the bytes), or with ``fallback`` off the pageable tensor as it is (a buffer pinned only for
    speed, which must not cost that RAM: the GPU assist's moments)."""
    t = torch.zeros(n, dtype=dtype)
    if n == 0:
        return t
    if not register(t):
        if not fallback:
            return t
        log.warning("cudaHostRegister failed; using torch's pinned allocator")
        return torch.zeros(n, dtype=dtype, pin_memory=True)
    return t


def register(t: torch.Tensor) -> bool:
    """Page-lock ``t``'s memory in place (e.g. a 4 KiB-aligned NVMe ring buffer); False if the driver refused."""
    if t.numel() == 0:
        return True
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), _PORTABLE))
    if err != 0:
        log.warning("cudaHostRegister failed (error %d)", err)
        _clear_last_error()
        return False
    _registered.add(t.data_ptr())
    return True


def release(t: torch.Tensor) -> None:
    """Unlock a tensor from ``pinned_zeros`` before its memory goes back to the system."""
    ptr = t.data_ptr()
    if ptr in _registered:
        _registered.discard(ptr)
        torch.cuda.cudart().cudaHostUnregister(ptr)


_registered: set[int] = set()


def _clear_last_error() -> None:
    """A failed cudaHostRegister stays this thread's last CUDA error, and torch's binding does not read it
    back: the next kernel launch's check would raise it as its own. Read it (which resets it) through the
    libcudart this process loaded; where none is found (a static runtime), nothing is done."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
    except (OSError, AttributeError):
        pass

