"""The NVMe tier on 2 ranks (two gloo processes, one state file each): NVMe state steps as
torch.optim.AdamW on an unsharded copy, whole and partial placement, clip, skip and accumulation, and
bit for bit as the RAM path does (trained beside it in the same process, with no reference).

Session 3 could not assert the RAM equality here: two RAM runs seemed to differ. They did not; the
harness read the rank count before the first engine joined the group (tests/dist/test_determinism_2ranks.py).
"""

import dataclasses
import json
import os
import pathlib

import pytest
import torch.multiprocessing as mp

from support.equivalence import Case
from support.spawn import free_port, rank_env
from support.tolerance import check

pytestmark = pytest.mark.dist

CASES = [Case("clip_mixed", max_norm=2.0, lr=1e-2, steps=12),
         Case("partial_nan_skip", max_norm=1.0, bucket_params=3000, nvme_ratio=0.5, nan_step=2, steps=5),
         Case("accum2_clip", max_norm=2.0, lr=1e-2, grad_accum=2, steps=4)]


def _worker(rank: int, world: int, port: int, out_path: str, tests_dir: str, state_dir: str) -> None:
    rank_env(rank, world, port, tests_dir)
    import torch

    torch.set_num_threads(1)
    from support.equivalence import run_case, train_state

    results = {}
    for case in CASES:
        results[case.name] = run_case(dataclasses.replace(case, nvme_path=state_dir), keep_state=True)
        nvme, ram = results[case.name].pop("final_state"), train_state(case)["state"]
        results[case.name]["ram_bitwise"] = len(nvme) == len(ram) and all(
            torch.equal(a, b) for a, b in zip(nvme, ram))
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, results)
    if rank == 0:
        pathlib.Path(out_path).write_text(json.dumps(everyone))
    import heavylift.dist.env

    heavylift.dist.env.shutdown()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from heavylift.optim import native

    native.load()  # once here: two ranks building it would race for the same build directory
    out, state = tmp_path_factory.mktemp("dist") / "results.json", tmp_path_factory.mktemp("nvme")
    tests = os.path.dirname(os.path.dirname(__file__))
    mp.spawn(_worker, args=(2, free_port(), str(out), tests, str(state)), nprocs=2, join=True)
    assert not any(state.iterdir()), "each rank removes its state file when its engine closes"
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_two_ranks_nvme_matches_torch_adamw(case, results):
    for rank_results in results:
        result = rank_results[case.name]
        check(result, case.steps, case.lr)
        assert result["ram_bitwise"], "NVMe state differs from the RAM path's"
        if case.nan_step >= 0:
            assert result["skipped"][case.nan_step] == [True, True] and result["skip_bit_identical"]
