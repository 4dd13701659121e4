"""Checksums of every file of a checkpoint: computed when saving, verified before anything is loaded.

sha256 (hashlib, OpenSSL: ~1-2 GB/s per core with SHA extensions), the files split across the ranks
and across a few threads per rank (hashlib releases the GIL on large buffers). Sizes are compared
first, so a truncated file is named without reading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from concurrent.futures import ThreadPoolExecutor

from heavylift.checkpoint.paths import MANIFEST

_BLOCK = 8 << 20


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def list_files(root: pathlib.Path) -> list[str]:
    """Every file under ``root`` but the manifest, as sorted POSIX paths relative to ``root``."""
    out = []
    for d, _dirs, files in os.walk(root):
        for name in files:
            rel = (pathlib.Path(d) / name).relative_to(root).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def my_share(files: list[str], rank: int, world: int) -> list[str]:
    return files[rank::world]


def hash_files(root: pathlib.Path, files: list[str]) -> dict[str, dict]:
    """{file: {"size", "sha256"}} for the given files under ``root``."""
    def one(rel: str) -> tuple[str, dict]:
        path = root / rel
        return rel, {"size": path.stat().st_size, "sha256": sha256_file(path)}

    with ThreadPoolExecutor(max_workers=min(4, max(len(files), 1))) as pool:
        return dict(pool.map(one, files))


def write_manifest(root: pathlib.Path, entries: dict[str, dict]) -> None:
    path = root / MANIFEST
    with open(path, "w") as f:
        json.dump({"algorithm": "sha256", "files": dict(sorted(entries.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(root: pathlib.Path) -> dict[str, dict]:
    path = root / MANIFEST
    try:
        return json.loads(path.read_text())["files"]
    except FileNotFoundError:
        raise _error(root, MANIFEST, "is missing (an incomplete or foreign checkpoint)") from None
    except (ValueError, KeyError) as e:
        raise _error(root, MANIFEST, f"is unreadable ({e})") from None


def check_listing(root: pathlib.Path, manifest: dict[str, dict]) -> list[str]:
    """Problems visible without reading contents: missing files and wrong sizes (truncation)."""
    problems = []
    for rel, entry in manifest.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)")
    return problems


def check_contents(root: pathlib.Path, manifest: dict[str, dict], files: list[str]) -> list[str]:
    """Problems found by hashing ``files`` (this rank's share) against the manifest."""
    got = hash_files(root, files)
    return [f"{root / rel}: sha256 {got[rel]['sha256'][:12]}... does not match the manifest's "
            f"{manifest[rel]['sha256'][:12]}... (corrupted or modified)"
            for rel in files if got[rel]["sha256"] != manifest[rel]["sha256"]]


def _error(root: pathlib.Path, rel: str, what: str):
    from heavylift.config.errors import HeavyliftError

    return HeavyliftError(f"checkpoint {root}: {root / rel} {what}; refusing to load it")
