"""The per-rank core planner on synthetic hosts (pure: no affinity is changed here)."""

import os

import pytest

from heavylift.config.errors import HeavyliftError
from heavylift.dist import cores
from heavylift.dist.cores import RankInfo, parse_cpulist, plan_cores


def host(physical: int, smt: bool = False, nodes: int = 1):
    """Linux numbering: CPU i and i + physical are SMT siblings; NUMA nodes are blocks of physical cores."""
    logical = physical * (2 if smt else 1)
    siblings = {c: ((c % physical, c % physical + physical) if smt else (c,)) for c in range(logical)}
    per_node = physical // nodes
    numa_of = {c: (c % physical) // per_node for c in range(logical)}
    return siblings, numa_of


def ranks(n: int, topo, masks=None, gpu_numa=None, name="box", first_rank=0):
    siblings, numa_of = topo
    every = tuple(sorted(siblings))
    return [RankInfo(rank=first_rank + i, local_rank=i, host=name, allowed=tuple(masks[i]) if masks else every,
                     gpu_numa=gpu_numa[i] if gpu_numa else None, siblings=siblings, numa_of=numa_of)
            for i in range(n)]


def check_disjoint(plans):
    seen = set()
    for p in plans.values():
        assert not seen & set(p.cpus)
        seen |= set(p.cpus)
        assert set(p.train_cpus) | set(p.worker_cpus) == set(p.cpus)
        assert p.worker_threads >= 1


def test_one_node_64_cores_4_ranks_same_mask():
    plans = plan_cores(ranks(4, host(64)))
    check_disjoint(plans)
    assert [p.cpus for p in plans.values()] == [tuple(range(16 * i, 16 * i + 16)) for i in range(4)]
    for p in plans.values():
        assert p.physical_cores == 16 and p.worker_threads == 15 and len(p.train_cpus) == 1
        assert p.how == "split" and p.numa_node == 0
        assert any("same 64-CPU mask" in n for n in p.notes)  # the unbound-launcher pitfall, detected


def test_smt_siblings_stay_with_their_core_and_count_once():
    plans = plan_cores(ranks(4, host(32, smt=True)))
    check_disjoint(plans)
    p0 = plans[0]
    assert p0.physical_cores == 8 and p0.worker_threads == 7
    assert p0.cpus == tuple(range(0, 8)) + tuple(range(32, 40))
    assert p0.train_cpus == (0, 32)


def test_smt_off_uses_logical_cores():
    plans = plan_cores(ranks(2, host(6)))
    assert [p.physical_cores for p in plans.values()] == [3, 3]
    assert plans[1].cpus == (3, 4, 5) and plans[1].train_cpus == (3,) and plans[1].worker_cpus == (4, 5)


def test_two_numa_nodes_follow_the_gpus():
    # GPUs 0, 2 on node 1 and 1, 3 on node 0: each rank's cores come from its GPU's node.
    plans = plan_cores(ranks(4, host(32, smt=True, nodes=2), gpu_numa=[1, 0, 1, 0]))
    check_disjoint(plans)
    assert [p.numa_node for p in plans.values()] == [1, 0, 1, 0]
    assert plans[0].cpus == tuple(range(16, 24)) + tuple(range(48, 56))
    assert plans[1].cpus == tuple(range(0, 8)) + tuple(range(32, 40))


def test_two_numa_nodes_unknown_gpu_node_balances():
    plans = plan_cores(ranks(4, host(32, nodes=2)))
    check_disjoint(plans)
    assert sorted(p.numa_node for p in plans.values()) == [0, 0, 1, 1]
    assert all(p.physical_cores == 8 for p in plans.values())


def test_numa_node_without_gpu_left_idle_with_a_note():
    plans = plan_cores(ranks(2, host(16, nodes=2), gpu_numa=[0, 0]))
    assert [p.numa_node for p in plans.values()] == [0, 0]
    assert all(p.physical_cores == 4 for p in plans.values())
    assert any("no GPU" in n for n in plans[0].notes)


def test_overlapping_masks_split_from_the_union():
    masks = [range(0, 12), range(4, 16)]
    plans = plan_cores(ranks(2, host(16), masks=masks))
    check_disjoint(plans)
    assert plans[0].cpus == tuple(range(8)) and plans[1].cpus == tuple(range(8, 16))
    assert not any("same" in n for n in plans[0].notes)


def test_launcher_bound_disjoint_masks_are_kept():
    masks = [range(8, 16), range(0, 8)]  # numactl -C per rank, deliberately crossed
    plans = plan_cores(ranks(2, host(16), masks=masks))
    assert plans[0].cpus == tuple(range(8, 16)) and plans[1].cpus == tuple(range(8))
    assert {p.how for p in plans.values()} == {"own"}


def test_uneven_cores_give_the_first_ranks_one_more():
    plans = plan_cores(ranks(3, host(8)))
    assert [p.physical_cores for p in plans.values()] == [3, 3, 2]
    check_disjoint(plans)


def test_one_core_per_rank_shares_it_with_one_worker_thread():
    plans = plan_cores(ranks(2, host(2)))
    for p in plans.values():
        assert p.physical_cores == 1 and p.worker_threads == 1 and p.worker_cpus == p.train_cpus == p.cpus


def test_fewer_physical_than_ranks_falls_back_to_siblings():
    plans = plan_cores(ranks(4, host(2, smt=True)))
    check_disjoint(plans)
    assert all(len(p.cpus) == 1 for p in plans.values())
    assert any("SMT siblings split" in n for n in plans[0].notes)


def test_fewer_cores_than_ranks_is_a_clear_error():
    with pytest.raises(HeavyliftError) as e:
        plan_cores(ranks(4, host(2)))
    msg = str(e.value)
    assert "4 ranks but only 2 CPU core(s)" in msg and "--nproc-per-node" in msg and "HEAVYLIFT_BIND_CORES=off" in msg


def test_two_hosts_planned_separately():
    infos = ranks(2, host(8), name="a") + ranks(2, host(4), name="b", first_rank=2)
    plans = plan_cores(infos)
    assert [plans[r].physical_cores for r in range(4)] == [4, 4, 2, 2]
    assert plans[2].local_rank == 0 and plans[2].cpus == (0, 1)


def test_two_launchers_on_one_machine_share_its_cores():
    # two torchrun "nodes" on one machine (a CPU test, or containers sharing a host): local ranks repeat
    infos = ranks(2, host(8)) + ranks(2, host(8), first_rank=2)
    plans = plan_cores(infos)
    check_disjoint(plans)
    assert [plans[r].cpus for r in range(4)] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert plans[3].local_rank == 1 and plans[3].local_world == 4


def test_train_cores_parameter():
    plans = plan_cores(ranks(1, host(16)), train_cores=2)
    assert plans[0].train_cpus == (0, 1) and plans[0].worker_threads == 14


def test_parse_cpulist_and_sysfs_of_this_machine():
    assert parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    info = cores.local_info(0, 0)
    assert set(info.allowed) == os.sched_getaffinity(0)
    plan = plan_cores([info])[0]
    assert set(plan.cpus) <= set(info.allowed) and plan.worker_threads >= 1


def test_pci_numa_node_parses_both_spellings(monkeypatch, tmp_path):
    dev = tmp_path / "0000:1b:00.0"
    dev.mkdir()
    (dev / "numa_node").write_text("1\n")
    monkeypatch.setattr(cores, "_SYS_PCI", str(tmp_path))
    assert cores.pci_numa_node("00000000:1B:00.0") == 1
    assert cores.pci_numa_node("0000:1b:00.0") == 1
    (dev / "numa_node").write_text("-1\n")
    assert cores.pci_numa_node("1b:00.0") is None
    assert cores.pci_numa_node("garbage") is None


def test_bind_cores_off_and_bad_value(monkeypatch):
    monkeypatch.setattr(cores, "_plan", None)
    monkeypatch.setenv("HEAVYLIFT_BIND_CORES", "sometimes")
    with pytest.raises(HeavyliftError, match="HEAVYLIFT_BIND_CORES"):
        cores.bind_cores(0, 0)
    monkeypatch.setenv("HEAVYLIFT_BIND_CORES", "off")
    plan = cores.bind_cores(0, 0)
    assert plan.how == "unbound" and plan.worker_threads >= 1 and cores.current_plan() is plan


def _fake_group(monkeypatch, world: int, allowed: tuple[int, ...]):
    """bind_cores over a pretend process group of ``world`` ranks on one host with ``allowed`` CPUs."""
    import torch.distributed as dist

    monkeypatch.setattr(cores, "_plan", None)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)

    def gather(out, info, group=None):
        for r in range(world):
            out[r] = cores.RankInfo(r, r, "h/1", allowed)
    monkeypatch.setattr(dist, "all_gather_object", gather)
    monkeypatch.setattr(cores, "apply_plan", lambda plan: plan.worker_threads)  # plan only: pin nothing here


def test_binding_is_on_by_default_with_several_ranks(monkeypatch):
    monkeypatch.delenv("HEAVYLIFT_BIND_CORES", raising=False)
    monkeypatch.setattr(cores, "_plan", None)
    assert cores.bind_cores(0, 0).how == "unbound"  # one rank (no group): nothing to split
    _fake_group(monkeypatch, 2, (0, 1, 2, 3))
    plan = cores.bind_cores(0, 0)
    assert plan.how == "split" and plan.cpus == (0, 1)
    _fake_group(monkeypatch, 2, (0, 1, 2, 3))
    monkeypatch.setenv("HEAVYLIFT_BIND_CORES", "off")
    assert cores.bind_cores(0, 0).how == "unbound"


def test_too_few_cores_unbound_by_default_error_when_asked(monkeypatch, caplog):
    _fake_group(monkeypatch, 4, (0, 1))
    monkeypatch.delenv("HEAVYLIFT_BIND_CORES", raising=False)
    with caplog.at_level("WARNING", logger="heavylift"):
        assert cores.bind_cores(0, 0).how == "unbound"
    assert "not bound" in caplog.text and "4 ranks but only 2 CPU core(s)" in caplog.text
    _fake_group(monkeypatch, 4, (0, 1))
    monkeypatch.setenv("HEAVYLIFT_BIND_CORES", "auto")
    with pytest.raises(cores.TooFewCores, match="--nproc-per-node"):
        cores.bind_cores(0, 0)
