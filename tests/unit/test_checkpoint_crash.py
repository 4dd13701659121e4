"""Crash safety: `kill -9` in the middle of a save leaves the previous checkpoint loadable and no half
checkpoint visible; SIGTERM becomes a stop request the loop honours after its step."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from heavylift.checkpoint import Preemption, load, save
from heavylift.checkpoint.paths import complete_tags, read_latest
from support.checkpointing import local_state, new_engine

_SAVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import torch.distributed.checkpoint as dcp
    from heavylift.checkpoint import save
    from support.checkpointing import new_engine, train

    directory, marker = sys.argv[2], sys.argv[3]
    engine = new_engine()
    train(engine, range(1))
    save(engine, directory, "step-1")
    train(engine, range(1, 2))
    write_data = dcp.FileSystemWriter.write_data

    def slow_write_data(self, plan, planner):  # the data is on disk; the checkpoint is not finished
        fut = write_data(self, plan, planner)
        fut.wait()
        open(marker, "w").close()
        time.sleep(120)
        return fut

    dcp.FileSystemWriter.write_data = slow_write_data
    save(engine, directory, "step-2")
""")


def test_kill_9_during_save_keeps_the_previous_checkpoint(tmp_path):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "writing"
    tests_dir = os.path.dirname(os.path.dirname(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, tests_dir, str(ckpt), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert proc.poll() is None, "the saver exited early"
            assert time.monotonic() < deadline, "the saver never reached its second save"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert complete_tags(ckpt) == ["step-1"] and read_latest(ckpt) == "step-1"
    assert not (ckpt / "step-2").exists() and (ckpt / ".tmp-step-2").is_dir()

    engine = new_engine(seed=4)
    assert load(engine, ckpt, "latest")["tag"] == "step-1"
    assert engine.global_step == 1
    save(engine, ckpt, "step-2")  # a later save of that tag clears the debris
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-1", "step-2"]
    fresh = new_engine(seed=6)
    load(fresh, ckpt, "latest")
    assert all(torch.equal(a, b) for a, b in zip(local_state(fresh), local_state(engine)))
    fresh.close()
    engine.close()


def test_sigterm_requests_a_stop_and_the_handler_is_restored():
    previous = signal.getsignal(signal.SIGTERM)
    with Preemption() as preempt:
        assert not preempt.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempt.should_stop() and preempt.requested == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


def test_preempted_loop_saves_and_resumes(tmp_path):
    """The trainer's pattern: finish the step, save, stop; the resumed run continues from there."""
    from support.checkpointing import train

    engine = new_engine()
    with Preemption() as preempt:
        for step in range(10):
            train(engine, range(step, step + 1))
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            if preempt.should_stop(engine.device):
                save(engine, tmp_path, f"step-{engine.global_step}")
                break
    assert read_latest(tmp_path) == "step-3"
    resumed = new_engine(seed=2)
    load(resumed, tmp_path, "latest")
    assert resumed.global_step == 3
    resumed.close()
    engine.close()


def test_a_save_without_room_is_refused_before_writing(tmp_path, monkeypatch):
    """Too little free space (or an unusable directory): a one-line error naming the need, the free
    space and checkpoint_dir, raised before a byte is written; the previous checkpoint stays latest."""
    import collections
    import shutil

    import pytest

    import importlib

    save_module = importlib.import_module("heavylift.checkpoint.save")
    from heavylift.config.errors import HeavyliftError
    from support.checkpointing import train

    engine = new_engine()
    train(engine, range(1))
    ckpt = tmp_path / "ckpt"
    save(engine, ckpt, "step-1")
    real = shutil.disk_usage
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(save_module.shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - 4096, 4096))
    train(engine, range(1, 2))
    with pytest.raises(HeavyliftError, match=r"checkpoint needs about .* GiB in .*, 0\.0 GiB free.*checkpoint_dir"):
        save(engine, ckpt, "step-2", keep=1)
    assert complete_tags(ckpt) == ["step-1"] and read_latest(ckpt) == "step-1"
    assert not (ckpt / ".tmp-step-2").exists() and not (ckpt / "step-2").exists()
    monkeypatch.setattr(save_module.shutil, "disk_usage", real)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(HeavyliftError, match="cannot use checkpoint directory .*set checkpoint_dir"):
        save(engine, blocked / "ckpt", "step-2")
    save(engine, ckpt, "step-2", keep=1)  # with room: saved, and the older one pruned after
    assert complete_tags(ckpt) == ["step-2"]
