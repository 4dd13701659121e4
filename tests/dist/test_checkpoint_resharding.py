"""Resume on another world size: saved on 1 rank, resumed on 2 (gloo), and saved on 2, resumed on 1.

Both continue the same recipe (support/checkpointing.py) and must match the uninterrupted run to fp32
rounding (support/tolerance.py's argument: N * lr * 1e-4 on the weights, 1e-4 relative on the moments).
Also the primitive: uneven and empty torch.chunk shards (3 and 1 rows on 2 ranks) round-trip."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from support.checkpointing import CASE, full_state, max_differences, new_engine, train
from support.tolerance import REL
from support.spawn import free_port, rank_env

pytestmark = pytest.mark.dist
N = 3
UNEVEN = {"three": (3, 4), "one": (1, 5), "scalar": ()}


def _uneven_values() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(shape, generator=g) for k, shape in UNEVEN.items()}


def _uneven_state(mesh, locals_: dict[str, torch.Tensor]) -> dict:
    """Each rank's torch.chunk shard (3 rows on 2 ranks: 2 + 1; 1 row: 1 + 0) as a DTensor; no copy."""
    from heavylift.checkpoint.state import rows_shape, sharded

    return {k: sharded(t, mesh, rows_shape(UNEVEN[k])) for k, t in locals_.items()}


def _worker(rank: int, world: int, port: int, tmp: str, tests_dir: str) -> None:
    rank_env(rank, world, port, tests_dir)
    torch.set_num_threads(1)
    import torch.distributed.checkpoint as dcp

    from heavylift.checkpoint import load, save

    # 1 -> 2: resume the one-rank checkpoint and finish the run on two ranks
    engine = new_engine(seed=7)
    load(engine, f"{tmp}/one", "latest")
    train(engine, range(N, 2 * N))
    state = full_state(engine)
    if rank == 0:
        torch.save(state, f"{tmp}/one_to_two.pt")
    engine.close()
    # 2 -> 1: the two-rank run, checkpointed halfway; the uninterrupted reference
    engine = new_engine()
    train(engine, range(N))
    save(engine, f"{tmp}/two", f"step-{N}", extra={"note": "two ranks"})
    train(engine, range(N, 2 * N))
    state = full_state(engine)
    if rank == 0:
        torch.save(state, f"{tmp}/two_ref.pt")
    # uneven shards, as a DCP primitive
    from heavylift.shard.layout import local_shard

    shards = {k: local_shard(v, rank, world) for k, v in _uneven_values().items()}
    dcp.save(_uneven_state(engine.env.mesh, shards), checkpoint_id=f"{tmp}/uneven")
    engine.close()
    from heavylift.dist.env import shutdown

    shutdown()


def test_resume_across_world_sizes(tmp_path):
    import torch.distributed.checkpoint as dcp

    from heavylift.checkpoint import load, save

    # the one-rank run, checkpointed halfway, and its uninterrupted reference
    engine = new_engine()
    train(engine, range(N))
    save(engine, tmp_path / "one", f"step-{N}")
    train(engine, range(N, 2 * N))
    one_ref = full_state(engine)
    engine.close()

    tests_dir = os.path.dirname(os.path.dirname(__file__))
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), tests_dir), nprocs=2, join=True)

    engine = new_engine(seed=7)
    extra = load(engine, tmp_path / "two", "latest")
    assert extra["note"] == "two ranks" and extra["saved_world_size"] == 2
    train(engine, range(N, 2 * N))
    two_to_one = full_state(engine)
    uneven = {k: torch.zeros(shape or (1,)) for k, shape in UNEVEN.items()}
    dcp.load(_uneven_state(engine.env.mesh, uneven), checkpoint_id=str(tmp_path / "uneven"))
    engine.close()

    for name, got, ref in (("1->2", torch.load(tmp_path / "one_to_two.pt"), one_ref),
                           ("2->1", two_to_one, torch.load(tmp_path / "two_ref.pt"))):
        d = max_differences(got, ref)
        assert d["param"] <= 2 * N * CASE.lr * REL, (name, d)
        assert d["exp_avg_rel"] <= REL and d["exp_avg_sq_rel"] <= REL, (name, d)
        assert d["steps_equal"] and d["counters_equal"] and d["lr_equal"], (name, d)
    for k, v in _uneven_values().items():
        assert torch.equal(uneven[k].reshape(v.shape), v), k
