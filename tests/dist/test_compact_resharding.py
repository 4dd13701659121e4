"""int8-moments checkpoints reshard exactly: saved on 1 rank and loaded on 2 (gloo), and saved on 2 and
loaded on 1, every master, code and scale lands where it belongs, so the gathered state (masters and
dequantized moments) is bitwise the saved one. Blocks follow rows, so a shard's scales are whole rows
of the parameter's scale table (optim/quant.py)."""

import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp

from support.checkpointing import CASE, full_state, new_engine, train
from support.spawn import free_port, rank_env

pytestmark = pytest.mark.dist
N = 2
INT8 = dataclasses.replace(CASE, name="int8", state_format="int8-moments")


def _worker(rank: int, world: int, port: int, tmp: str, tests_dir: str) -> None:
    rank_env(rank, world, port, tests_dir)
    torch.set_num_threads(1)
    from heavylift.checkpoint import load, save
    from heavylift.dist.env import shutdown

    engine = new_engine(seed=7, case=INT8)
    load(engine, f"{tmp}/one", "latest")
    loaded = full_state(engine)
    train(engine, range(N, 2 * N), INT8)
    save(engine, f"{tmp}/two", f"step-{2 * N}")
    saved = full_state(engine)
    if rank == 0:
        torch.save({"loaded": loaded, "saved": saved}, f"{tmp}/two.pt")
    engine.close()
    shutdown()


def _assert_same(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for name, (x, y) in ((n, (a["params"][n], b["params"][n])) for n in a["params"]):
        for i, (s, t) in enumerate(zip(x, y)):
            assert (s == t) if isinstance(s, float) else torch.equal(s, t), (name, i)
    assert (a["global_step"], a["micro_step"]) == (b["global_step"], b["micro_step"])


def test_int8_moments_reshard_bitwise(tmp_path):
    from heavylift.checkpoint import load, save

    engine = new_engine(case=INT8)
    train(engine, range(N), INT8)
    save(engine, tmp_path / "one", f"step-{N}")
    one = full_state(engine)
    engine.close()

    tests_dir = os.path.dirname(os.path.dirname(__file__))
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), tests_dir), nprocs=2, join=True)
    two = torch.load(tmp_path / "two.pt")
    _assert_same(two["loaded"], one)  # 1 -> 2

    engine = new_engine(seed=9, case=INT8)
    load(engine, tmp_path / "two", "latest")
    _assert_same(full_state(engine), two["saved"])  # 2 -> 1
    train(engine, range(2 * N, 2 * N + 1), INT8)  # and it trains on
    engine.close()
