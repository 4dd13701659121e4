"""The CUDA caching allocator's setting: heavylift's commands turn on expandable segments unless told otherwise.

A capped card fills up: the GPU tail, the kept activations and the buckets in flight leave little slack, and
the caching allocator then splits and frees whole segments (``num_alloc_retries``: a cache flush and a device
synchronize each). Expandable segments map more memory into one segment instead. Measured on one H200 capped
as an 80 GB card (benchmarks/results/2026-12-03-h200-session10): llama-8b seq 4096 x accum 8 went from 6.24
to 5.53 s/step (alloc retries 9 -> 5), qwen3-4b seq 4096 x 4 from 1.32 to 1.06 (4 -> 0).

torch reads the setting from the environment once, at or before the first CUDA allocation (``import torch``
may already register it), so it is set in the environment before torch is imported: by ``heavylift``'s
command line (cli.main) and for the processes the bench starts. A library user who imports torch first sets
``PYTORCH_CUDA_ALLOC_CONF`` themselves; the engine's startup log says which it runs with.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# torch >= 2.9 reads PYTORCH_ALLOC_CONF first and PYTORCH_CUDA_ALLOC_CONF after it (the older name, still read)
ENV_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
EXPANDABLE = "expandable_segments:True"


def given_setting(environ: MutableMapping[str, str] | None = None) -> tuple[str, str] | None:
    """The allocator setting the environment already gives, as (variable, value), in torch's order."""
    env = os.environ if environ is None else environ
    for name in ENV_NAMES:
        if env.get(name, "").strip():
            return name, env[name]
    return None


def prefer_expandable_segments(environ: MutableMapping[str, str] | None = None) -> bool:
    """Turn expandable segments on in ``environ`` (default: this process's), unless a setting is already
    there (the user's choice stands, ``expandable_segments:False`` included). True where it set it."""
    env = os.environ if environ is None else environ
    if given_setting(env) is not None:
        return False
    env["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE  # the name torch 2.11 and 2.13 both read
    return True


def expandable_segments_on(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether the environment's setting turns expandable segments on (the last mention wins, as in torch)."""
    given = given_setting(environ)
    if given is None:
        return False
    on = False
    for item in given[1].split(","):
        key, _, value = item.partition(":")
        if key.strip() == "expandable_segments":
            on = value.strip().lower() in ("true", "1")
    return on


def allocator_note(environ: MutableMapping[str, str] | None = None) -> str:
    """One line for the engine's startup log: which allocator setting this process runs with."""
    given = given_setting(environ)
    if expandable_segments_on(environ):
        return f"CUDA allocator: expandable segments ({given[0]}={given[1]})"
    where = f"{given[0]}={given[1]}" if given else "no PYTORCH_ALLOC_CONF"
    return (f"CUDA allocator: expandable segments off ({where}); on a capped card they measured 11-20% faster "
            f"(set PYTORCH_CUDA_ALLOC_CONF={EXPANDABLE} before importing torch; heavylift's command line does)")
