"""``save``: write a checkpoint that becomes visible only once complete and checksummed.

Every rank, in order (a barrier between the steps that read what other ranks wrote):

    rank 0: clear <dir>/.tmp-<tag>           | barrier
    all:    DCP save of the sharded state     (collective; files fsynced by DCP's writer)
            rank-<r>.pt (RNG), fsync
    rank 0: meta.json, hf/ (config, tokenizer)| barrier
    all:    sha256 of a 1/W share of the files -> gather to rank 0
    rank 0: manifest.json, fsync everything, rename .tmp-<tag> -> <tag>, `latest` -> <tag>, prune
                                              | barrier
A crash anywhere before the rename leaves only a ``.tmp-`` directory, which loading never reads.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from heavylift.checkpoint import paths, rng
from heavylift.checkpoint.manifest import hash_files, list_files, my_share, write_manifest
from heavylift.checkpoint.nvme_state import planners
from heavylift.checkpoint.state import scalar_state, tensor_state

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "vocab.txt", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json", "generation_config.json")


def save(engine, directory: str | os.PathLike, tag: str, extra: dict | None = None, keep: int = 0,
         tokenizer=None) -> pathlib.Path:
    """Save everything needed to resume ``engine`` exactly into ``<directory>/<tag>``; collective.

    ``extra``: JSON-able trainer state (e.g. ``{"loader": loader.state_dict()}``), handed back by ``load``.
    ``keep``: keep only this many newest checkpoints (0: all). ``tokenizer``: an object with
    ``save_pretrained`` or a directory holding tokenizer files, stored for ``export``.
    Returns the checkpoint's path.
    """
    paths.check_tag(tag)
    directory = pathlib.Path(directory)
    rank, world = engine.env.rank, engine.env.world_size
    main = rank == 0
    tmp, final = directory / f"{paths.TMP_PREFIX}{tag}", directory / tag
    engine.pipeline.wait_all()  # the CPU worker may still be writing the last step's state
    # The measured placement stops adapting here, in this run as in any resumed from this checkpoint: both
    # then step with the split it records, which bit-identical continuation needs (a checkpoint after the
    # first few steps finds it settled already).
    engine.settle_placement()
    state = tensor_state(engine)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    _check_space(directory, state, main, keep, engine.env.device)
    if main:
        tmp.mkdir(parents=True)
    dist.barrier()
    # One file per tensor: DCP's writer keeps every tensor of a file alive until the file is closed, and
    # clones each of ours (views into the bucket buffers), so one file per rank would briefly double
    # the rank's host state (measured: +1.88 GiB for a 1.88 GiB checkpoint; one tensor at a time now).
    # NVMe-resident state goes through the ring, one bucket at a time (checkpoint/nvme_state.py).
    try:
        dcp.save(state, planner=planners(engine)[0],
                 storage_writer=dcp.FileSystemWriter(tmp / paths.STATE, single_file_per_rank=False, sync_files=True))
    finally:
        if engine.ring is not None:
            engine.ring.let_go()
    _write_rank_file(tmp / paths.rank_file(rank))
    if main:
        meta = {**scalar_state(engine), "tag": tag, "extra": extra or {}}
        (tmp / paths.META).write_text(json.dumps(meta, indent=1, default=_json_fallback))
        _write_hf_files(engine.module, tokenizer, tmp / paths.HF)
    dist.barrier()
    files = list_files(tmp)
    shares = [None] * world if main else None
    dist.gather_object(hash_files(tmp, my_share(files, rank, world)), shares, dst=0)
    if main:
        write_manifest(tmp, {k: v for share in shares for k, v in share.items()})
        paths.fsync_tree(tmp)
        paths.publish(tmp, final)
        paths.write_atomic(directory / paths.LATEST, tag)
        paths.prune(directory, keep, protect=tag)
    dist.barrier()
    return final


def _check_space(directory: pathlib.Path, state: dict, main: bool, keep: int, device: torch.device) -> None:
    """Refuse (on every rank at once, before anything is written) a save the filesystem has no room for.

    Need per node: this rank's shards times the ranks on the node (shards are near equal), plus the
    replicated tensors (frozen weights, buffers; written once, by rank 0) and 64 MiB of metadata slack.
    """
    local = sum(_local_bytes(t) for k, t in state.items() if not k.startswith(("frozen.", "buffer.")))
    shared = sum(_local_bytes(t) for k, t in state.items() if k.startswith(("frozen.", "buffer."))) if main else 0
    need = local * int(os.environ.get("LOCAL_WORLD_SIZE", "1")) + shared + (64 << 20)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
        problem = "" if free >= need else (
            f"checkpoint needs about {need / 2**30:.1f} GiB in {directory}, {free / 2**30:.1f} GiB free: "
            f"free space there or set checkpoint_dir to a disk with room"
            + (f" (keep_checkpoints={keep} deletes older ones only after the new one is complete)" if keep else ""))
    except OSError as e:
        problem = f"cannot use checkpoint directory {directory}: {e.strerror or e}; set checkpoint_dir to a writable path"
    flag = torch.tensor([1 if problem else 0], device=device)  # on the process group's device (NCCL: GPU)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if problem or flag.item():
        from heavylift.config.errors import HeavyliftError

        raise HeavyliftError(problem or "checkpoint not saved: another rank has no room or no access (see its error)")


def _local_bytes(t) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size() if isinstance(local, torch.Tensor) else 0


def _write_rank_file(path: pathlib.Path) -> None:
    with open(path, "wb") as f:
        torch.save(rng.capture(), f)
        f.flush()
        os.fsync(f.fileno())


def _write_hf_files(module, tokenizer, out: pathlib.Path) -> None:
    out.mkdir()
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(out)
    generation = getattr(module, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(out)
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
        return
    src = pathlib.Path(tokenizer)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copyfile(src / name, out / name)


def _json_fallback(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (pathlib.Path, torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"checkpoint metadata cannot hold {type(obj).__name__}: pass JSON-able values in `extra`")
