"""The same equivalence suite on 2 ranks: two gloo processes, each training on its own batch."""

import json
import os

import pytest
import torch.multiprocessing as mp

from support.equivalence import CASES
from support.tolerance import check
from support.spawn import free_port, rank_env

pytestmark = pytest.mark.dist


def _worker(rank: int, world: int, port: int, out_path: str, tests_dir: str) -> None:
    rank_env(rank, world, port, tests_dir)
    import torch

    torch.set_num_threads(1)
    from support.equivalence import CASES, run_case

    results = {c.name: run_case(c) for c in CASES}
    from unit.test_meta_init import init_masters  # noqa: E402

    masters = init_masters()
    if rank == 0:
        torch.save(masters, out_path + ".meta.pt")
        with open(out_path, "w") as f:
            json.dump(results, f)
    from heavylift.dist.env import shutdown

    shutdown()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.json"
    tests_dir = os.path.dirname(os.path.dirname(__file__))
    from heavylift.optim import native

    native.load()  # build the kernel once here, not in two ranks racing for the same build directory
    mp.spawn(_worker, args=(2, free_port(), str(out), tests_dir), nprocs=2, join=True)
    results = json.loads(out.read_text())
    results["_meta_path"] = str(out) + ".meta.pt"
    return results


def test_meta_init_shards_do_not_depend_on_world_size(two_rank_results, tmp_path_factory):
    """Two ranks drawing a meta model's values give bit-identical full weights to one rank."""
    import torch

    from unit.test_meta_init import init_masters

    two = torch.load(two_rank_results["_meta_path"])
    one = init_masters()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_two_ranks_match_torch_adamw(case, two_rank_results):
    result = two_rank_results[case.name]
    check(result, case.steps, case.lr)
    if case.unused_param:
        assert result["untouched_equal"]
    if case.nan_step >= 0:
        assert result["skipped"][case.nan_step] == [True, True]
        assert result["skip_bit_identical"]
