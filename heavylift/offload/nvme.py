"""The NVMe tier's file: each rank's optimizer state for the buckets that do not fit in RAM, one
preallocated file per rank, read ahead of the CPU step and written behind it.

Layout: bucket regions one after another, each a list of buffers (master, moments, in whatever format),
every buffer starting on a 4 KiB boundary, so a bucket moves with one vectored call per chunk and the
same offsets serve O_DIRECT::

    heavylift-rank{r}.state:  | bucket i: buf0 | pad | buf1 | pad | ... | bucket j: ... |

I/O runs on a small pool of threads (``os.preadv``/``os.pwritev`` release the GIL), each request split
into chunks so that several are in flight at once (NVMe needs queue depth to reach its bandwidth). A
request returns a future; the caller (the pipeline's worker) waits on it only when it needs the data.

Everything that can go wrong is checked before anything is written: the path exists, is a directory,
is writable, and has room for the whole file (which is then preallocated, so a full disk cannot strike
mid-run). A short read (the file truncated under us) or an I/O error raises a HeavyliftError naming the
file, the offset and what to check; the last checkpoint is untouched by either.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from heavylift.config.errors import ConfigError, HeavyliftError

ALIGN = 4096
CHUNK = 8 << 20  # bytes per request: large enough for sequential throughput, small enough to spread
DISK_MARGIN = 1 << 30  # keep this much of the disk free beyond the state file


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def region_layout(buffer_bytes: list[list[int]]) -> list[list[tuple[int, int]]]:
    """(offset, length) of every buffer of every bucket region, each buffer 4 KiB aligned; pure."""
    out, pos = [], 0
    for region in buffer_bytes:
        spans = []
        for n in region:
            spans.append((pos, n))
            pos = align_up(pos + n)
        out.append(spans)
    return out


def file_bytes(layout: list[list[tuple[int, int]]]) -> int:
    return max((align_up(o + n) for spans in layout for o, n in spans), default=0)


def aligned_empty(shape: tuple[int, ...] | int, dtype: torch.dtype) -> Tensor:
    """A CPU tensor whose data starts on a 4 KiB boundary (O_DIRECT needs it; torch aligns to 64 B)."""
    numel = shape if isinstance(shape, int) else int(torch.Size(shape).numel())
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    off = (-raw.data_ptr()) % ALIGN
    t = raw[off: off + nbytes].view(dtype)
    return t if isinstance(shape, int) else t.view(shape)


def check_nvme_path(path: str, need_bytes: int) -> Path:
    """Refuse, before anything is allocated or written, a path the state file cannot live in."""
    if not path:
        raise ConfigError("offload.nvme_path", path, "a directory on a local NVMe drive (offload.device is nvme)")
    p = Path(path)
    if not p.exists():
        raise ConfigError("offload.nvme_path", path, "an existing directory (create it, or point it at the "
                          "NVMe drive's mount point)")
    if not p.is_dir():
        raise ConfigError("offload.nvme_path", path, "a directory, not a file")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError("offload.nvme_path", path, "a directory this user can write (check its owner and "
                          "permissions)")
    free = shutil.disk_usage(p).free
    if free < need_bytes + DISK_MARGIN:
        raise HeavyliftError(f"offload.nvme_path {path}: the optimizer state needs {need_bytes / 2**30:.1f} GiB "
                             f"there (+{DISK_MARGIN / 2**30:.0f} GiB margin) but the disk has "
                             f"{free / 2**30:.1f} GiB free: free space, choose another drive, or use a "
                             "compact offload.state_format")
    return p


class StateFile:
    """One rank's preallocated state file and the threads that move bucket regions in and out."""

    def __init__(self, directory: str, rank: int, buffer_bytes: list[list[int]], threads: int = 4,
                 direct: bool = True, name: str = ""):
        self.layout = region_layout(buffer_bytes)
        size = file_bytes(self.layout)
        root = check_nvme_path(directory, size)
        self.path = root / (name or f"heavylift-rank{rank}.state")
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        self.direct = False
        fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.path, flags | os.O_DIRECT, 0o600)
                self.direct = True
            except OSError:  # tmpfs and some filesystems refuse O_DIRECT: page cache it is
                fd = -1
        if fd < 0:
            fd = os.open(self.path, flags, 0o600)
        self.fd = fd
        try:
            if size:
                os.posix_fallocate(fd, 0, size)
        except OSError as e:
            self._close_fd()
            self.path.unlink(missing_ok=True)
            raise HeavyliftError(f"{self.path}: could not reserve {size / 2**30:.1f} GiB ({os.strerror(e.errno)}): "
                                 "free space or choose another offload.nvme_path") from None
        self.size = size
        self._pool = ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="heavylift-nvme")
        self._lock = threading.Lock()
        self.bytes_read = self.bytes_written = 0

    # ---- requests -------------------------------------------------------------------------------
    def read(self, region: int, buffers: list[Tensor]) -> Future:
        """Fill ``buffers`` from bucket ``region``; the future completes when every byte has arrived."""
        return self._submit(region, buffers, write=False)

    def write(self, region: int, buffers: list[Tensor]) -> Future:
        """Write ``buffers`` to bucket ``region``; the buffers must stay untouched until the future is done."""
        return self._submit(region, buffers, write=True)

    def read_at(self, offset: int, t: Tensor) -> Future:
        """Fill ``t`` from the bytes at ``offset`` (a piece of a region: one tensor of a checkpoint)."""
        return self._submit_spans([(offset, t.numel() * t.element_size())], [t], write=False)

    def write_at(self, offset: int, t: Tensor) -> Future:
        return self._submit_spans([(offset, t.numel() * t.element_size())], [t], write=True)

    def _submit(self, region: int, buffers: list[Tensor], write: bool) -> Future:
        spans = self.layout[region]
        if len(buffers) != len(spans):
            raise AssertionError(f"region {region} has {len(spans)} buffers, got {len(buffers)}")
        return self._submit_spans(spans, buffers, write)

    def _submit_spans(self, spans: list[tuple[int, int]], buffers: list[Tensor], write: bool) -> Future:
        parts: list[Future] = []
        for (offset, length), t in zip(spans, buffers):
            if t.numel() * t.element_size() != length or not t.is_contiguous() or t.device.type != "cpu":
                raise AssertionError(f"buffer for offset {offset} is not {length} contiguous CPU bytes")
            if offset + length > self.size:
                raise AssertionError(f"{length} bytes at offset {offset} run past the {self.size}-byte file")
            view = t.view(torch.uint8).numpy()
            for start in range(0, length, CHUNK):
                n = min(CHUNK, length - start)
                parts.append(self._pool.submit(self._io, write, view[start: start + n], offset + start))
        return _all_of(parts)

    def _io(self, write: bool, mem, offset: int) -> None:
        n = len(mem)
        if self.direct and (offset % ALIGN or n % ALIGN or mem.ctypes.data % ALIGN):
            self._io_buffered(write, mem, offset)  # a ragged tail: through the page cache
        else:
            self._io_on(self.fd, write, mem, offset)
        with self._lock:
            if write:
                self.bytes_written += n
            else:
                self.bytes_read += n

    def _io_on(self, fd: int, write: bool, mem, offset: int) -> None:
        done, n = 0, len(mem)
        while done < n:
            try:
                k = (os.pwritev if write else os.preadv)(fd, [mem[done:]], offset + done)
            except OSError as e:
                raise self._error(write, offset + done, e) from None
            if k == 0:
                raise HeavyliftError(f"{self.path}: read {done} of {n} bytes at offset {offset}: the state file "
                                     "was truncated or replaced while training; the run cannot continue (resume "
                                     "from the last checkpoint)")
            done += k

    def _io_buffered(self, write: bool, mem, offset: int) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as e:  # the file was removed or replaced under us
            raise self._error(write, offset, e) from None
        try:
            self._io_on(fd, write, mem, offset)
        finally:
            os.close(fd)

    def _error(self, write: bool, offset: int, e: OSError) -> HeavyliftError:
        what = "write" if write else "read"
        hint = ("the disk is full" if e.errno == errno.ENOSPC else
                "the drive reported an I/O error: check dmesg and the drive's health" if e.errno == errno.EIO else
                os.strerror(e.errno or 0))
        return HeavyliftError(f"{self.path}: {what} at offset {offset} failed ({hint}); the last checkpoint is "
                              "untouched: resume from it once the drive is fixed")

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self, remove: bool = True) -> None:
        self._pool.shutdown(wait=True)
        self._close_fd()
        if remove:
            self.path.unlink(missing_ok=True)

    def _close_fd(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1


def _all_of(parts: list[Future]) -> Future:
    """One future for many: done when all are, carrying the first error."""
    out: Future = Future()
    if not parts:
        out.set_result(None)
        return out
    left = [len(parts)]
    lock = threading.Lock()

    def one_done(f: Future) -> None:
        with lock:
            left[0] -= 1
            if out.done():
                return
            if f.exception() is not None:
                out.set_exception(f.exception())
            elif left[0] == 0:
                out.set_result(None)

    for f in parts:
        f.add_done_callback(one_done)
    return out
