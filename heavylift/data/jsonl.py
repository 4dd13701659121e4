"""Read JSONL files, one object per line; every mistake names the file and the line."""

from __future__ import annotations

import json
import pathlib

from heavylift.config.errors import HeavyliftError


def read_jsonl(path: str | pathlib.Path) -> list[tuple[str, dict]]:
    """``[(where, record)]`` with ``where`` = ``"file:line"``, for the errors found later (missing fields...)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise HeavyliftError(f"data file {str(path)!r} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise HeavyliftError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise HeavyliftError(f"{where}: each line must be a JSON object, not a {type(record).__name__}")
            records.append((where, record))
    if not records:
        raise HeavyliftError(f"data file {str(path)!r} is empty")
    return records
