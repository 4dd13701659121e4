"""A collective that one rank never joins ends in a HeavyliftError naming rank, world size and phase."""

import time

import pytest
import torch.multiprocessing as mp

from heavylift.config.errors import HeavyliftError
from heavylift.dist import guard
from support.spawn import free_port, rank_env

pytestmark = pytest.mark.dist


def _worker(rank: int, port: int, out_path: str, done) -> None:
    rank_env(rank, 2, port, LOCAL_WORLD_SIZE="2", HEAVYLIFT_COLLECTIVE_TIMEOUT_S="2")
    import torch
    import torch.distributed as dist

    from heavylift.dist.env import init_dist
    from heavylift.dist.guard import guarded

    env = init_dist()
    with guarded("warm-up all-reduce"):  # a collective both ranks join passes through untouched
        t = torch.ones(1)
        dist.all_reduce(t)
    assert t.item() == 2.0
    if rank == 1:  # stuck: never joins the next collective, stays alive until rank 0 has its error
        done.wait(30)
        return
    start = time.monotonic()
    try:
        with guarded("grad-norm all-reduce"):
            dist.all_reduce(torch.ones(1))
        msg = "no error"
    except HeavyliftError as e:
        msg = f"{e}|{time.monotonic() - start:.1f}|{env.cores.worker_threads}"
    finally:
        done.set()
    with open(out_path, "w") as f:
        f.write(msg)


def test_timeout_names_rank_world_and_phase(tmp_path):
    out = tmp_path / "msg.txt"
    done = mp.get_context("spawn").Event()
    mp.spawn(_worker, args=(free_port(), str(out), done), nprocs=2, join=True)
    msg, elapsed, threads = out.read_text().split("|")
    assert msg.startswith("rank 0/2: timed out after 2 s in 'grad-norm all-reduce'"), msg
    assert "another rank probably died or is stuck; check its log" in msg
    assert "HEAVYLIFT_COLLECTIVE_TIMEOUT_S=2" in msg
    assert 1.5 < float(elapsed) < 8 and int(threads) >= 1


@pytest.mark.parametrize("text,kind", [
    ("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 2000ms for recv operation to complete", "timeout"),
    ("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE)", "timeout"),
    ("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234", "lost"),
    ("NCCL communicator was aborted on rank 0", "lost"),
    ("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)", None),
])
def test_failure_classification(text, kind):
    assert guard._is_comm_failure(RuntimeError(text)) == kind
    assert guard._is_comm_failure(ValueError(text)) is None


def test_ordinary_errors_pass_through_and_comm_errors_convert():
    with pytest.raises(ValueError):
        with guard.guarded("x"):
            raise ValueError("not a collective problem")
    with pytest.raises(HeavyliftError, match=r"rank 0/1: lost contact with another rank after \d+ s in 'y'"):
        with guard.guarded("y"):
            raise RuntimeError("Connection reset by peer")


def test_timeout_setting(monkeypatch):
    monkeypatch.delenv(guard.ENV, raising=False)
    assert guard.collective_timeout_s() == 600
    monkeypatch.setenv(guard.ENV, "30")
    assert guard.collective_timeout_s() == 30
    from heavylift.dist.env import process_group_timeout
    assert process_group_timeout("gloo").total_seconds() == 30
    assert process_group_timeout("nccl").total_seconds() == 60  # guarded phases report before NCCL's watchdog
    for bad in ("0", "-5", "ten", "nan"):
        monkeypatch.setenv(guard.ENV, bad)
        with pytest.raises(HeavyliftError, match=guard.ENV):
            guard.collective_timeout_s()
