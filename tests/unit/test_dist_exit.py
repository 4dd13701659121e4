"""Exit with gloo: the wait for gloo's worker threads (heavylift.dist.env.settle_gloo_workers).
benchmarks/gloo_exit_race.py reproduces the abort it prevents; tests/dist/test_torchrun.py checks for it."""

import atexit
import itertools
import time

import torch
import torch.distributed as dist

from heavylift.dist import env


def test_settles_once_the_workers_wait_for_work():
    env.init_dist()  # a one-rank gloo group in this process, as the other in-process tests make
    dist.all_reduce(torch.ones(1000))
    workers = env._gloo_workers()
    start = time.monotonic()
    assert env.settle_gloo_workers()
    assert time.monotonic() - start < 1.0
    assert workers and all(state.startswith("S") for state, *_ in env._gloo_workers().values())


def test_gives_up_after_its_limit(monkeypatch):
    counter = itertools.count()
    monkeypatch.setattr(env, "_gloo_workers", lambda: {1: ("R (running)", str(next(counter)), "0")})
    start = time.monotonic()
    assert env.settle_gloo_workers(interval_s=0.001, limit_s=0.05) is False
    assert time.monotonic() - start < 0.5


def test_registered_at_exit_once(monkeypatch):
    seen = []
    monkeypatch.setattr(env, "_registered", False)
    monkeypatch.setattr(atexit, "register", seen.append)
    env._settle_at_exit()
    env._settle_at_exit()
    assert seen == [env.settle_gloo_workers]
