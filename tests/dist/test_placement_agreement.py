"""The measured placement's counts are agreed over the ranks (offload/placement.py): two gloo ranks that
measure different spare memory grow the same tail and keep the same blocks, and a rank with no host bucket
joins every all-reduce without vetoing. The placement itself needs a GPU; here its decisions run on a
stand-in engine whose all-reduce is the real one (InitPlacement._min_over_ranks over gloo)."""

from __future__ import annotations

import types

import torch
from torch import nn

from support.spawn import publish, rank_env, spawn_ranks

GIB = 2**30


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = True


class _Probe:
    def __init__(self, nbytes: int):
        self.bytes = nbytes

    def remove(self) -> None:
        pass


def _engine(rank: int, world: int, host_numels: list[int]):
    from heavylift.engine_placement import InitPlacement

    e = types.SimpleNamespace(env=types.SimpleNamespace(world_size=world, is_main=rank == 0),
                              device=torch.device("cpu"), first_ram=0, first_tail=len(host_numels), grown=[],
                              buckets=[types.SimpleNamespace(spec=types.SimpleNamespace(numel=n)) for n in host_numels])
    e._min_over_ranks = types.MethodType(InitPlacement._min_over_ranks, e)
    e.grow_tail = lambda n: e.grown.append(min(n, e.first_tail - e.first_ram))  # capped, as Engine.grow_tail
    return e


def _placement(engine, blocks):
    from heavylift.offload.placement import AutoPlacement

    p = object.__new__(AutoPlacement)  # its __init__ reads the card; the decisions need only these
    p.engine, p.blocks, p.tail, p.recompute, p.tail_bytes, p.log, p.probe = engine, blocks, True, True, 16, [], None
    return p


def _worker(rank, world, port, out, tests_dir):
    rank_env(rank, world, port, tests_dir)
    from heavylift.dist.env import init_dist

    init_dist()
    results = {}
    # the tail into the memory left: rank 0's spare holds 3 buckets, rank 1's only 1
    e = _engine(rank, world, [2**20] * 4)
    _placement(e, [])._grow_tail_into([3, 1][rank] * 2**20 * 16, "the memory left")
    results["tail"] = e.grown
    # rank 1 has no host bucket: no say, and it still joins the all-reduce (no hang)
    e = _engine(rank, world, [[2**20] * 4, []][rank])
    _placement(e, [])._grow_tail_into(2 * 2**20 * 16, "the memory left")
    results["tail_no_say"] = e.grown
    # kept blocks: each rank's spare memory holds a different number of probed blocks
    blocks = [_Block() for _ in range(6)]
    p = _placement(_engine(rank, world, [1]), blocks)
    blocks[-1].gradient_checkpointing, p.probe = False, _Probe(GIB)
    p._spare = lambda: [4, 2][rank] * int(1.15 * GIB) + 1
    p._stage3()
    results["kept"] = [not b.gradient_checkpointing for b in blocks]
    # the probe block broke the margin on one rank only: it recomputes again on both
    blocks = [_Block() for _ in range(3)]
    p = _placement(_engine(rank, world, [1]), blocks)
    blocks[-1].gradient_checkpointing, p.probe = False, _Probe(GIB)
    p._spare = lambda: [5 * GIB, -1][rank]
    p._stage3()
    results["broke"] = [not b.gradient_checkpointing for b in blocks]
    # the tail to hide a clipped step (stage 2): rank 0's CPU is slow (it needs more tail), rank 1's memory
    # is short (it fits less): all grow min(the largest need, the smallest fit); the assist and probe are off
    from heavylift.offload.tail import buckets_to_move, forward_deadlines, tail_for_hiding

    # bucket 0 arrives first (the last block, unit 6); bucket 7 last (the root unit 7, embeddings)
    numels, units = [2**20] * 8, [6, 5, 4, 3, 2, 1, 0, 7]
    rate, spare = [1e7, 4e7][rank], [8, 3][rank] * 2**20 * 16  # needs 7 and 2; fits 8 and 3
    e = _engine(rank, world, numels)
    for b, u in zip(e.buckets, units):
        b.spec.unit = u
    e.pipeline = types.SimpleNamespace(cpu_params=rate, cpu_seconds=1.0, assisting=False, gpu_assist=0.0,
                                       redo_assisted=False)
    p = _placement(e, [])
    p.assist, p.recompute, p._spare, p._forward_s, p._note = False, False, lambda: spare, lambda: 0.2, lambda _: None
    p._stage2()
    deadlines = forward_deadlines(units, dict(zip(units, numels)), 7, 0.2)
    results["stage2"] = {"grown": e.grown, "need": tail_for_hiding(numels, deadlines, rate),
                         "fits": buckets_to_move(numels, spare // 16)}
    publish(results, out)


def test_placement_counts_are_agreed_over_ranks(tmp_path):
    r0, r1 = spawn_ranks(_worker, 2, tmp_path)
    assert r0["tail"] == r1["tail"] == [1]  # the smaller of 3 and 1
    assert r0["tail_no_say"] == [2] and r1["tail_no_say"] == [0]  # rank 1 did not veto rank 0's 2
    assert r0["kept"] == r1["kept"] == [False, False, False, True, True, True]  # probe block + the smaller 2
    assert r0["broke"] == r1["broke"] == [False, False, False]
    need, fits = max(r["stage2"]["need"] for r in (r0, r1)), min(r["stage2"]["fits"] for r in (r0, r1))
    assert r0["stage2"]["need"] != r1["stage2"]["need"] and r0["stage2"]["fits"] != r1["stage2"]["fits"]
    assert r0["stage2"]["grown"] == r1["stage2"]["grown"] == [min(need, fits)] == [3]  # not min(2, 3) = 2
