"""SHA-256 of files and file ranges, read in chunks: bundles, sources, engines and audit logs."""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

CHUNK = 1 << 20


def sha256_range(f: BinaryIO, start: int = 0, n: int | None = None) -> str:
    """Hex SHA-256 of `n` bytes of the open file `f` from `start` (to its end when n is None)."""
    h = hashlib.sha256()
    f.seek(start)
    left = float("inf") if n is None else n
    while left > 0:
        chunk = f.read(int(min(left, CHUNK)))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return sha256_range(f)
