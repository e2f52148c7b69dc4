"""Files written whole or not at all: every result, config and metrics file of a run goes through here.

Each writer puts the content into a temporary file of its own beside the target (a unique name, so processes of a
multi-host job writing the same file never share one), then renames it over the target. A reader sees the old
file or the new one, never half of one. A failed write leaves the previous file and removes its temporary; a
process killed mid-write (kill -9) can leave only a hidden `.<name>.*.tmp` beside it, never a half-written target.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """`data` as the whole of `path` (its directory is created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomically(path, text.encode())


def write_json_atomically(path: str | os.PathLike, value: Any, *, indent: int | None = 2,
                          sort_keys: bool = False) -> Path:
    """`value` as JSON plus a newline; values JSON cannot hold (paths, numpy scalars) are written as strings."""
    return write_text_atomically(path, json.dumps(value, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def write_jsonl_atomically(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line (the metrics.jsonl format)."""
    return write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def save_npy_atomically(path: str | os.PathLike, array: np.ndarray) -> Path:
    """`np.save` of `array` at exactly `path` (no .npy suffix appended)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return write_bytes_atomically(path, buffer.getvalue())
