"""The NVMe tier's state file (CPU, a temp directory): round trips, alignment, and every failure named."""

from __future__ import annotations

import os

import pytest
import torch

from heavylift.config.errors import ConfigError, HeavyliftError
from heavylift.offload import nvme
from heavylift.offload.nvme import ALIGN, StateFile, aligned_empty, check_nvme_path, file_bytes, region_layout


def _buffers(seed: int, sizes=(1000, 333, 4096)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        t = aligned_empty(n, torch.float32 if i != 1 else torch.bfloat16)
        t.copy_(torch.randn(n, generator=g))
        out.append(t)
    return out


def _bytes(bufs):
    return [t.numel() * t.element_size() for t in bufs]


def test_layout_aligns_every_buffer():
    layout = region_layout([[10, 5000], [4096]])
    assert layout == [[(0, 10), (4096, 5000)], [(12288, 4096)]]
    assert file_bytes(layout) == 16384
    assert all(o % ALIGN == 0 for spans in layout for o, _ in spans)


def test_aligned_empty_is_page_aligned():
    for n in (1, 1000, 123457):
        assert aligned_empty(n, torch.float32).data_ptr() % ALIGN == 0
    assert aligned_empty((3, 5), torch.bfloat16).shape == (3, 5)


@pytest.mark.parametrize("direct", [True, False])
def test_regions_round_trip_in_any_order(tmp_path, direct, monkeypatch):
    monkeypatch.setattr(nvme, "CHUNK", 8192)  # many chunks in flight per buffer
    regions = [_buffers(0), _buffers(1, (7, 9000)), _buffers(2, (4096, 1, 77))]
    f = StateFile(str(tmp_path), rank=3, buffer_bytes=[_bytes(r) for r in regions], threads=3, direct=direct)
    assert f.path.name == "heavylift-rank3.state" and f.path.stat().st_size == f.size
    futures = [f.write(i, r) for i, r in reversed(list(enumerate(regions)))]
    for fut in futures:
        fut.result()
    for i, r in enumerate(regions):
        back = [aligned_empty(t.numel(), t.dtype) for t in r]
        f.read(i, back).result()
        for a, b in zip(r, back):
            assert torch.equal(a, b)
    assert f.bytes_written == f.bytes_read == sum(sum(_bytes(r)) for r in regions)
    f.close()
    assert not f.path.exists()


def test_path_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="offload.nvme_path.*existing directory"):
        check_nvme_path(str(tmp_path / "missing"), 1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="a directory, not a file"):
        check_nvme_path(str(tmp_path / "file"), 1)
    with pytest.raises(ConfigError, match="offload.nvme_path"):
        check_nvme_path("", 1)
    with pytest.raises(HeavyliftError, match="GiB free"):
        check_nvme_path(str(tmp_path), 1 << 60)  # more than any disk: refused before a byte is written
    assert not any(p.name.startswith("heavylift-rank") for p in tmp_path.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="this user can write"):
            StateFile(str(ro), 0, [[4096]])
    finally:
        ro.chmod(0o700)


def test_truncated_file_is_a_clear_error(tmp_path):
    bufs = _buffers(0)
    f = StateFile(str(tmp_path), 0, [_bytes(bufs)], direct=False)
    f.write(0, bufs).result()
    os.truncate(f.path, 100)  # someone truncated the state file under us
    with pytest.raises(HeavyliftError, match="truncated"):
        f.read(0, [aligned_empty(t.numel(), t.dtype) for t in bufs]).result()
    f.close()


def test_io_error_names_the_file_and_the_way_back(tmp_path):
    bufs = _buffers(0)
    f = StateFile(str(tmp_path), 0, [_bytes(bufs)], direct=False)
    os.close(f.fd)  # the descriptor goes bad: EBADF stands in for a failing drive
    f.fd = os.open(os.devnull, os.O_RDONLY)
    # the chunks go to a pool of threads, so whichever fails first is reported: any offset, the file named
    with pytest.raises(HeavyliftError, match=r"heavylift-rank0\.state: write at offset \d+ failed.*last checkpoint"):
        f.write(0, bufs).result()
    f.close()


def test_buffers_must_match_the_layout(tmp_path):
    f = StateFile(str(tmp_path), 0, [[4096, 4096]], direct=False)
    with pytest.raises(AssertionError):
        f.write(0, [aligned_empty(1024, torch.float32)])
    with pytest.raises(AssertionError):
        f.write(0, [aligned_empty(1024, torch.float32), aligned_empty(10, torch.float32)])
    f.close()
