"""Per-rank CPU core plan on each host: disjoint physical cores per local rank, NUMA-local to its GPU.

Every rank reports (host, local rank, the cores it may run on, its GPU's NUMA node, the host's SMT and
NUMA layout) over the process group; :func:`plan_cores` (pure, unit-tested with synthetic hosts) turns
that into one :class:`CorePlan` per rank; :func:`apply_plan` pins the process to it. Within a rank's
set, the first physical core runs the training thread and the copy launches; the rest run the CPU
optimizer's threads (at least one).

The split is made from the *union* of a host's masks, never from each rank's own mask: a launcher
that binds nothing gives every rank the same mask, and splitting that mask per rank (what
SuperOffload's worker does) would stack every rank's optimizer threads on the same cores. Only masks
that are already pairwise disjoint (``numactl -C``/``taskset`` per rank) are kept as given.

Call :func:`bind_cores` (``heavylift.dist.env.init_dist`` does, once per process) right after
``init_process_group`` and before the model is built: OpenMP sizes its pools and threads inherit their
mask when they are created. Threads that exist already are re-pinned one by one, so a late call is
correct, only later than it could be. Host memory needs no policy of its own: with every thread on
cores of the rank's NUMA node, the kernel's default first-touch policy places the host state there.
Binding is on by default when there are several ranks (``HEAVYLIFT_BIND_CORES`` unset or ``auto``);
``off`` leaves each rank its own mask. Unset, a host with fewer cores than ranks runs them unbound with a
warning; set to ``auto``, that is an error.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from heavylift.config.errors import HeavyliftError

log = logging.getLogger("heavylift")

_SYS_CPU = "/sys/devices/system/cpu"
_SYS_NODE = "/sys/devices/system/node"
_SYS_PCI = "/sys/bus/pci/devices"


class TooFewCores(HeavyliftError):
    """A host has fewer allowed CPUs than ranks."""


@dataclass(frozen=True)
class RankInfo:
    """What one rank knows about itself and its host (all-gathered; plain data, picklable)."""

    rank: int
    local_rank: int
    host: str  # hostname plus boot id: two machines with one hostname still differ
    allowed: tuple[int, ...]  # os.sched_getaffinity(0)
    gpu_numa: int | None = None  # NUMA node of this rank's GPU, None if unknown or no GPU
    siblings: dict[int, tuple[int, ...]] = field(default_factory=dict)  # cpu -> its SMT siblings
    numa_of: dict[int, int] = field(default_factory=dict)  # cpu -> NUMA node


@dataclass(frozen=True)
class CorePlan:
    rank: int
    local_rank: int
    local_world: int  # processes on this machine (all of its launchers)
    host: str
    cpus: tuple[int, ...]  # logical CPUs for sched_setaffinity: the rank's physical cores with their siblings
    physical_cores: int
    train_cpus: tuple[int, ...]  # the core of the training thread and the copy launches
    worker_cpus: tuple[int, ...]  # the optimizer worker's cores (the train core if the rank has only one)
    worker_threads: int
    numa_node: int | None  # the node every one of the rank's cores sits in, None if several or unknown
    how: str  # "split" (union of the host's masks, split), "own" (launcher-bound masks kept), "unbound"
    notes: tuple[str, ...] = ()


# ---- reading this host ----------------------------------------------------------------------------------
def parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11)."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(set(out)))


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def read_topology(cpus: Iterable[int]) -> tuple[dict[int, tuple[int, ...]], dict[int, int]]:
    """SMT siblings and NUMA node of each CPU, from sysfs; missing entries mean unknown."""
    siblings: dict[int, tuple[int, ...]] = {}
    for cpu in cpus:
        text = _read(f"{_SYS_CPU}/cpu{cpu}/topology/thread_siblings_list")
        if text:
            siblings[cpu] = parse_cpulist(text)
    numa_of: dict[int, int] = {}
    for node_dir in glob.glob(f"{_SYS_NODE}/node[0-9]*"):
        text = _read(f"{node_dir}/cpulist")
        if text:
            node = int(os.path.basename(node_dir)[4:])
            for cpu in parse_cpulist(text):
                numa_of[cpu] = node
    return siblings, numa_of


def pci_numa_node(bus_id: str) -> int | None:
    """NUMA node of a PCI device ('00000000:1B:00.0' or '0000:1b:00.0'), None if unknown (-1 in sysfs)."""
    parts = bus_id.strip().lower().split(":")
    if len(parts) not in (2, 3):
        return None
    domain, bus, devfn = parts if len(parts) == 3 else ("0", *parts)
    try:
        domain = f"{int(domain, 16):04x}"
    except ValueError:
        return None
    text = _read(f"{_SYS_PCI}/{domain}:{bus}:{devfn}/numa_node")
    if text is None:
        return None
    node = int(text)
    return node if node >= 0 else None


def gpu_numa_node(index: int) -> int | None:
    """NUMA node of CUDA device ``index`` (visible-device numbering), None without CUDA or sysfs."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(index)
    except Exception:  # noqa: BLE001 - a probe: no answer is an answer
        return None
    bus = getattr(props, "pci_bus_id", None)
    if isinstance(bus, str):
        return pci_numa_node(bus)
    if isinstance(bus, int):
        domain, device = getattr(props, "pci_domain_id", 0), getattr(props, "pci_device_id", 0)
        return pci_numa_node(f"{domain:04x}:{bus:02x}:{device:02x}.0")
    return None


def host_id() -> str:
    boot = _read("/proc/sys/kernel/random/boot_id") or ""
    return f"{socket.gethostname()}/{boot}"


def local_info(rank: int, local_rank: int, gpu_index: int | None = None) -> RankInfo:
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    online = parse_cpulist(_read(f"{_SYS_CPU}/online") or "") or allowed
    siblings, numa_of = read_topology(online)
    gpu = gpu_numa_node(gpu_index) if gpu_index is not None else None
    return RankInfo(rank, local_rank, host_id(), allowed, gpu, siblings, numa_of)


# ---- planning (pure) ------------------------------------------------------------------------------------
def plan_cores(infos: Sequence[RankInfo], train_cores: int = 1) -> dict[int, CorePlan]:
    """One plan per rank, from every rank's :class:`RankInfo`. Deterministic: every rank computes the
    same answer from the same gathered list, so an error is raised on all ranks alike (no hang)."""
    hosts: dict[str, list[RankInfo]] = {}
    for info in infos:
        hosts.setdefault(info.host, []).append(info)
    out: dict[int, CorePlan] = {}
    for host, members in hosts.items():
        # By global rank: local ranks order the same way, and two launchers on one machine (two
        # "nodes" in a test, or containers sharing a host) still split its cores between them.
        for plan in _plan_host(host, sorted(members, key=lambda i: i.rank), train_cores):
            out[plan.rank] = plan
    return out


def _physical_cores(cpus: Iterable[int], siblings: dict[int, tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The CPUs grouped by physical core (SMT siblings together), each group sorted, groups by first CPU."""
    pool = set(cpus)
    cores = {tuple(sorted(set(siblings.get(c, (c,))) & pool | {c})) for c in pool}
    return sorted(cores)


def _plan_host(host: str, members: list[RankInfo], train_cores: int) -> list[CorePlan]:
    name = host.split("/")[0]
    n = len(members)
    if len({m.rank for m in members}) != n:
        raise HeavyliftError(f"host {name}: ranks {[m.rank for m in members]} repeat: each process needs its own RANK")
    topo = members[0]
    masks = [set(m.allowed) for m in members]
    union = set().union(*masks)
    disjoint = n > 1 and sum(len(m) for m in masks) == len(union)
    notes: list[str] = []
    if n > 1 and all(m == masks[0] for m in masks):
        notes.append(f"all {n} ranks on {name} were started with the same {len(union)}-CPU mask (launcher binds "
                     "nothing): split it into disjoint per-rank sets")
    if disjoint:  # the launcher bound each rank already: keep its choice
        groups = [_physical_cores(m, topo.siblings) for m in masks]
        return [_make_plan(m, n, name, g, topo, "own", train_cores, notes) for m, g in zip(members, groups)]

    cores = _physical_cores(union, topo.siblings)
    if len(cores) < n:
        if len(union) >= n:
            notes.append(f"{len(cores)} physical cores for {n} ranks on {name}: SMT siblings split between ranks")
            cores = [(c,) for c in sorted(union)]
        else:
            raise TooFewCores(
                f"host {name}: {n} ranks but only {len(union)} CPU core(s) allowed ({_fmt(union)}): each rank needs "
                f"at least one core of its own; start at most {len(union)} process(es) on this host "
                f"(torchrun --nproc-per-node), give the job more cores (container/cgroup CPU limit, taskset), or "
                "set HEAVYLIFT_BIND_CORES=off to run the ranks unbound on shared cores (slow)")
    groups = _numa_split(cores, members, topo, notes) or _even_split(cores, n)
    return [_make_plan(m, n, name, g, topo, "split", train_cores, notes) for m, g in zip(members, groups)]


def _even_split(cores: list[tuple[int, ...]], n: int) -> list[list[tuple[int, ...]]]:
    q, r = divmod(len(cores), n)
    out, start = [], 0
    for i in range(n):
        size = q + (1 if i < r else 0)
        out.append(cores[start:start + size])
        start += size
    return out


def _numa_split(cores: list[tuple[int, ...]], members: list[RankInfo], topo: RankInfo,
                notes: list[str]) -> list[list[tuple[int, ...]]] | None:
    """Each rank's cores from its GPU's NUMA node, or None when the host has one node (or none is known)."""
    by_node: dict[int, list[tuple[int, ...]]] = {}
    for core in cores:
        node = topo.numa_of.get(core[0])
        if node is None:
            return None
        by_node.setdefault(node, []).append(core)
    if len(by_node) < 2:
        return None
    ranks_of: dict[int, list[int]] = {node: [] for node in by_node}
    unplaced = []
    for i, m in enumerate(members):
        if m.gpu_numa in ranks_of:
            ranks_of[m.gpu_numa].append(i)
        else:
            unplaced.append(i)
    for i in unplaced:  # no known GPU node: the node with the most cores per rank
        node = max(sorted(by_node), key=lambda k: len(by_node[k]) / (len(ranks_of[k]) + 1))
        ranks_of[node].append(i)
    if any(len(by_node[k]) < len(r) for k, r in ranks_of.items()):
        notes.append("a NUMA node has fewer cores than the ranks whose GPU sits on it: cores split across nodes")
        return None
    idle = [k for k, r in ranks_of.items() if not r]
    if idle:
        notes.append(f"NUMA node(s) {idle} have no GPU: their {sum(len(by_node[k]) for k in idle)} cores stay "
                     "unused to keep each rank's memory local")
    out: list[list[tuple[int, ...]]] = [[] for _ in members]
    for node, ranks in ranks_of.items():
        if not ranks:
            continue
        for i, part in zip(ranks, _even_split(by_node[node], len(ranks))):
            out[i] = part
    return out


def _make_plan(m: RankInfo, n: int, host: str, cores: list[tuple[int, ...]], topo: RankInfo, how: str,
               train_cores: int, notes: list[str]) -> CorePlan:
    keep = min(train_cores, len(cores) - 1) if len(cores) > 1 else 0
    train = cores[:max(keep, 1)]
    workers = cores[keep:] if len(cores) > 1 else cores
    nodes = {topo.numa_of.get(c[0]) for c in cores}
    node = nodes.pop() if len(nodes) == 1 else None
    return CorePlan(rank=m.rank, local_rank=m.local_rank, local_world=n, host=host,
                    cpus=tuple(sorted(c for core in cores for c in core)), physical_cores=len(cores),
                    train_cpus=tuple(c for core in train for c in core),
                    worker_cpus=tuple(c for core in workers for c in core), worker_threads=len(workers),
                    numa_node=node, how=how, notes=tuple(notes))


def unbound_plan(info: RankInfo, local_world: int) -> CorePlan:
    """HEAVYLIFT_BIND_CORES=off: the rank keeps its mask; its thread count is its share of the mask."""
    cores = _physical_cores(info.allowed, info.siblings)
    share = max(len(cores) // max(local_world, 1), 1)
    return CorePlan(rank=info.rank, local_rank=info.local_rank, local_world=local_world, host=info.host.split("/")[0],
                    cpus=info.allowed, physical_cores=share, train_cpus=info.allowed, worker_cpus=info.allowed,
                    worker_threads=max(share - 1, 1), numa_node=None, how="unbound")


def _fmt(cpus: Iterable[int]) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    s = sorted(cpus)
    parts, i = [], 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        parts.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(parts)


def describe(plan: CorePlan) -> str:
    node = f", NUMA node {plan.numa_node}" if plan.numa_node is not None else ""
    return (f"rank {plan.rank} (local {plan.local_rank}/{plan.local_world} on {plan.host}): CPUs {_fmt(plan.cpus)} "
            f"({plan.physical_cores} physical{node}; {plan.how}); training thread on {_fmt(plan.train_cpus)}, "
            f"{plan.worker_threads} optimizer thread(s) on {_fmt(plan.worker_cpus)}")


# ---- side effects -------------------------------------------------------------------------------------
def apply_plan(plan: CorePlan) -> int:
    """Pin every thread of this process to the plan's CPUs; cap torch's intra-op threads at its
    physical cores. Returns the optimizer worker's thread count."""
    if plan.how == "unbound":
        return plan.worker_threads
    cpus = set(plan.cpus)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as e:  # e.g. a cgroup cpuset narrower than the union another rank reported
        raise HeavyliftError(f"rank {plan.rank}: cannot run on CPUs {_fmt(cpus)} ({e}): the ranks of one host "
                             "must share one CPU set (same container/cgroup), or set HEAVYLIFT_BIND_CORES=off") from e
    for tid in _threads():  # threads started already (OpenMP pools, gloo) keep their own mask otherwise
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass  # a thread that has exited since the listing
    try:
        import torch

        if torch.get_num_threads() > plan.physical_cores:
            torch.set_num_threads(plan.physical_cores)
    except ImportError:
        pass
    return plan.worker_threads


def pin_current_thread(cpus: Iterable[int]) -> None:
    """Narrow the calling thread (and the threads it starts later) to ``cpus``; for the optimizer worker."""
    os.sched_setaffinity(0, set(cpus))


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []


_plan: CorePlan | None = None


def current_plan() -> CorePlan | None:
    """The plan :func:`bind_cores` applied in this process, None before."""
    return _plan


def bind_cores(rank: int, local_rank: int, gpu_index: int | None = None, group=None,
               train_cores: int = 1) -> CorePlan:
    """Gather every rank's info, plan, apply this rank's plan (once per process); a collective."""
    global _plan
    if _plan is not None:
        return _plan
    import torch.distributed as dist

    from heavylift.dist.guard import guarded

    info = local_info(rank, local_rank, gpu_index)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    # On by default with several ranks (unset); "off" keeps each rank's own mask. The abort once seen with
    # binding on came from exit, not from binding (heavylift.dist.env, docs/log.md).
    given = os.environ.get("HEAVYLIFT_BIND_CORES", "").strip().lower()
    mode = given or ("auto" if world > 1 else "off")
    if mode in ("off", "0", "false", "no"):
        _plan = unbound_plan(info, local_world)
        return _plan
    if mode not in ("auto", "on", "1", "true", "yes"):
        raise HeavyliftError(f"HEAVYLIFT_BIND_CORES={mode!r} is not allowed: use auto (the default with several "
                             "ranks) or off")
    infos: list[RankInfo] = [info]
    if world > 1:
        gathered: list = [None] * world
        with guarded("core-plan all-gather", group):
            dist.all_gather_object(gathered, info, group=group)
        infos = gathered
    try:
        plan = plan_cores(infos, train_cores)[rank]
    except TooFewCores as e:  # every rank computed the same plan, so every rank is here
        if given:
            raise
        if rank == 0:
            log.warning("cores: not bound (%s)", e)
        _plan = unbound_plan(info, local_world)
        return _plan
    apply_plan(plan)
    _plan = plan
    level = logging.INFO if rank == 0 or plan.local_rank == 0 else logging.DEBUG
    log.log(level, "cores: %s", describe(plan))
    for note in plan.notes:
        log.log(level, "cores: %s", note)
    return plan
