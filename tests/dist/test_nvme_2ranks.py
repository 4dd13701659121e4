"""The NVMe tier on 2 ranks (two gloo processes, one state file each): NVMe state steps as
torch.optim.AdamW on an unsharded copy, whole and partial placement, clip, skip and accumulation.

Not asserted here: bitwise equality with the RAM path. On 2 ranks with an active clip, two runs of the
RAM path alone sometimes differ from each other in the last bits (found in session 3, docs/log.md; not
yet explained), so such a comparison would be flaky. One rank asserts it (tests/unit/test_nvme_pipeline.py)."""

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

CASES = [Case("clip_mixed", max_norm=2.0, steps=8),
         Case("partial_nan_skip", max_norm=1.0, bucket_params=3000, nvme_ratio=0.5, nan_step=2, steps=5),
         Case("accum2_clip", max_norm=2.0, lr=1e-2, grad_accum=2, steps=4)]


def _worker(rank: int, world: int, port: int, out_path: str, tests_dir: str, state_dir: str) -> None:
    rank_env(rank, world, port, tests_dir)
    import torch

    torch.set_num_threads(1)
    from support.equivalence import run_case

    results = {case.name: run_case(dataclasses.replace(case, nvme_path=state_dir)) for case in CASES}
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
        if case.nan_step >= 0:
            assert result["skipped"][case.nan_step] == [True, True] and result["skip_bit_identical"]
