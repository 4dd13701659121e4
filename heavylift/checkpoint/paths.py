"""Checkpoint directory layout and the filesystem moves that make a checkpoint appear atomically.

    <dir>/
      latest                 text file: the tag of the newest complete checkpoint
      <tag>/                 a complete checkpoint (only ever created by one rename)
        manifest.json        size and sha256 of every other file; written last
        meta.json            counters, scheduler, scaler, hyper-parameters, shapes, config, `extra`
        state/               torch.distributed.checkpoint files (sharded master, moments, steps)
        rank-<r>.pt          rank r's RNG states
        hf/                  the model's HF config (and tokenizer files when given), for export
      .tmp-<tag>/            a save in progress, or the debris of a killed one (never loaded)
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil

LATEST = "latest"
MANIFEST = "manifest.json"
META = "meta.json"
STATE = "state"
HF = "hf"
TMP_PREFIX = ".tmp-"
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_tag(tag: str) -> str:
    from heavylift.config.errors import HeavyliftError

    if not _TAG.match(tag) or tag == LATEST:
        raise HeavyliftError(f"checkpoint tag {tag!r} is not allowed: use letters, digits, '_', '.', '-' "
                             f"(not starting with '.' and not '{LATEST}'), e.g. 'step-100'")
    return tag


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def fsync_file(path: pathlib.Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: pathlib.Path) -> None:
    """fsync every file and directory under ``root`` (a rename is only durable over durable contents)."""
    for d, _dirs, files in os.walk(root):
        for name in files:
            fsync_file(pathlib.Path(d) / name)
        fsync_dir(pathlib.Path(d))


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Replace ``path`` with ``text``: write a sibling, fsync, rename, fsync the directory."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Rename a finished ``tmp`` checkpoint to ``final``; an older checkpoint of the same tag is removed
    only after it has been renamed out of the way (so a crash leaves one of the two, whole)."""
    old = None
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def complete_tags(directory: pathlib.Path) -> list[str]:
    """Tags of the complete checkpoints (those with a manifest), oldest first by modification time."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()]
    return [p.name for p in sorted(found, key=lambda p: ((p / MANIFEST).stat().st_mtime_ns, p.name))]


def read_latest(directory: pathlib.Path) -> str | None:
    """The tag ``latest`` names when that checkpoint is complete, else the newest complete one, else None."""
    pointer = directory / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if tag and (directory / tag / MANIFEST).is_file():
            return tag
    tags = complete_tags(directory)
    return tags[-1] if tags else None


def prune(directory: pathlib.Path, keep: int, protect: str) -> list[str]:
    """Delete all but the ``keep`` newest complete checkpoints (never ``protect``) and stale temporaries."""
    removed = []
    if keep > 0:
        tags = [t for t in complete_tags(directory) if t != protect]
        for tag in tags[: max(len(tags) - (keep - 1), 0)]:
            shutil.rmtree(directory / tag, ignore_errors=True)
            removed.append(tag)
    for p in directory.iterdir():  # debris of killed saves
        if p.is_dir() and p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
    return removed
