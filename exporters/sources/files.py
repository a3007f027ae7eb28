"""Reading a source's small files safely, and fingerprinting what was read (torch-free)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from gptdeploy.errors import SourceError
from gptdeploy.hashing import sha256_file


def read_json(path: Path) -> dict:
    """Parse a JSON object file; anything unreadable is a one-line SourceError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(
            f"{path} is not readable JSON ({_one_line(exc)}); restore or re-save the file"
        ) from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def describe(root: Path, name: str, fmt: str, files: list[Path], model_files: list[Path]) -> dict:
    """The manifest's account of a source: every file read with its SHA-256, and one digest
    over the files that define the model (weights + config), so two exports can be matched."""
    digests = {_rel(root, p): sha256_file(p) for p in files}
    combined = hashlib.sha256()
    for p in sorted(model_files, key=lambda q: _rel(root, q)):
        combined.update(f"{_rel(root, p)}\0{digests[_rel(root, p)]}\n".encode())
    return {"name": name, "format": fmt, "files": digests, "sha256": combined.hexdigest()}


def _rel(root: Path, path: Path) -> str:
    # "../data/x/meta.pkl" for files found beside the source, not absolute paths into a home dir.
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive, on Windows
        return path.as_posix()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
