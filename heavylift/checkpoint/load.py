"""``load``: verify a checkpoint completely, then restore an engine from it (on any world size).

    all ranks: resolve the tag (rank 0's answer is broadcast)
               verify: sizes (rank 0) and sha256 of a 1/W share of the files each, gathered; any problem
                       -> CorruptCheckpointError on every rank, naming the files, nothing touched yet
               meta.json -> compatibility check (same parameter names and shapes)
               rank-<r>.pt -> RNG states (in a temporary)
               DCP load straight into the state store and the frozen parameters (in place, resharded)
               masters -> device shards; counters, scheduler, scaler, hyper-parameters; RNG

The tensor state is read into the engine's own buffers, not into a staging copy: the checksums have
already proved every byte, so host memory stays at one copy of the optimizer state (issue 5, item 5).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from heavylift.checkpoint import paths, rng
from heavylift.checkpoint.manifest import check_contents, check_listing, my_share, read_manifest
from heavylift.checkpoint.nvme_state import planners
from heavylift.checkpoint.state import (apply_scalar_state, check_compatible, refresh_device_params,
                                        tensor_state)
from heavylift.config.errors import HeavyliftError

log = logging.getLogger("heavylift")


class CorruptCheckpointError(HeavyliftError):
    """A checkpoint whose files do not match its manifest (truncated, modified or missing)."""


def resolve(directory: pathlib.Path, tag: str) -> pathlib.Path:
    if tag != paths.LATEST:
        root = directory / paths.check_tag(tag)
        if not root.is_dir():
            raise HeavyliftError(f"no checkpoint {root} (complete ones in {directory}: "
                                 f"{paths.complete_tags(directory) or 'none'})")
        return root
    latest = paths.read_latest(directory)
    if latest is None:
        raise HeavyliftError(f"no complete checkpoint in {directory}")
    return directory / latest


def verify(root: pathlib.Path, rank: int = 0, world: int = 1) -> None:
    """Raise CorruptCheckpointError (on every rank) unless every file matches the manifest; collective
    when ``world > 1``."""
    manifest = read_manifest(root)
    problems = check_listing(root, manifest) if rank == 0 else []
    if world > 1:
        listed = [problems]
        dist.broadcast_object_list(listed, src=0)
        problems = listed[0]
    if not problems:
        problems = check_contents(root, manifest, my_share(sorted(manifest), rank, world))
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, problems)
            problems = [p for share in everyone for p in share]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CorruptCheckpointError(f"checkpoint {root} failed verification, refusing to load it: {shown}")


def load(engine, directory: str | os.PathLike, tag: str = "latest") -> dict:
    """Restore ``engine`` from ``<directory>/<tag>`` (``"latest"``: the newest complete one); collective.

    Returns the ``extra`` dict given to ``save`` (e.g. the data loader's state) with ``"tag"`` and
    ``"saved_world_size"`` added. Raises HeavyliftError before touching the engine when the checkpoint is
    missing, corrupted (CorruptCheckpointError) or of another model.
    """
    directory = pathlib.Path(directory)
    rank, world = engine.env.rank, engine.env.world_size
    root = _resolve_everywhere(directory, tag, rank, world)
    verify(root, rank, world)
    meta = json.loads((root / paths.META).read_text())
    check_compatible(engine, meta, str(root))
    rank_path = root / paths.rank_file(rank)
    rng_state = torch.load(rank_path, weights_only=True) if rank_path.is_file() else None

    engine.pipeline.wait_all()
    engine.pipeline.drop_window()  # the checkpoint holds a step boundary: no sum of a window begun here carries on
    if meta["world_size"] == world:  # on another rank count the buckets differ: the placement starts afresh
        engine.restore_placement(meta.get("placement"))
    try:  # NVMe-resident state is filled in the ring and written back, one bucket at a time
        dcp.load(tensor_state(engine), planner=planners(engine)[1],
                 storage_reader=dcp.FileSystemReader(root / paths.STATE))
    finally:
        if engine.ring is not None:
            engine.ring.let_go()
    refresh_device_params(engine)
    apply_scalar_state(engine, meta)
    if rng_state is not None:
        rng.restore(rng_state)
    elif rank == world - 1:
        log.warning("checkpoint %s was saved on %d ranks: ranks >= %d keep their current RNG states",
                    root, meta["world_size"], meta["world_size"])
    if meta["world_size"] != world and rank == 0:
        log.info("resumed %s, saved on %d ranks, on %d ranks", root, meta["world_size"], world)
    if world > 1:
        dist.barrier()
    return {**meta["extra"], "tag": meta["tag"], "saved_world_size": meta["world_size"]}


def _resolve_everywhere(directory: pathlib.Path, tag: str, rank: int, world: int) -> pathlib.Path:
    """Rank 0 resolves the tag; every rank gets its answer, or its error."""
    choice: list = [None]
    if rank == 0:
        try:
            choice = [str(resolve(directory, tag))]
        except HeavyliftError as e:
            choice = [e]
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], Exception):
        raise HeavyliftError(str(choice[0]))
    return pathlib.Path(choice[0])


def resume_auto(engine, directory: str | os.PathLike) -> dict | None:
    """``--resume auto``: load the newest checkpoint that verifies, skipping corrupted ones with a
    warning; None when ``directory`` holds no complete checkpoint (a fresh start)."""
    directory = pathlib.Path(directory)
    latest = paths.read_latest(directory)
    tags = [t for t in reversed(paths.complete_tags(directory)) if t != latest]
    for tag in ([latest] if latest else []) + tags:
        try:
            return load(engine, directory, tag)
        except CorruptCheckpointError as e:
            if engine.env.rank == 0:
                log.warning("skipping checkpoint: %s", e)
    return None
