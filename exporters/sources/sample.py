"""gptdeploy's own trained sample: an HF GPT-2 directory that also holds a sample.json card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from gptdeploy.exporters.sources import files, hf_gpt2

if TYPE_CHECKING:
    from gptdeploy.exporters.sources.base import Source

KIND = "sample"
DESCRIPTION = "gptdeploy sample (HF GPT-2 directory with a sample.json card)"

CARD = "sample.json"
FORMAT = "gptdeploy-sample"


def detect(path: Path) -> bool:
    if not (path.is_dir() and (path / CARD).is_file()):
        return False
    try:
        card = json.loads((path / CARD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # not ours; the HF GPT-2 loader may still take the directory
    return isinstance(card, dict) and card.get("format") == FORMAT


def load(path: Path, tokenizer: Path | None = None) -> Source:
    card = files.read_json(path / CARD)
    return hf_gpt2.load_dir(
        path, tokenizer, kind=KIND, fmt=DESCRIPTION, extra={"sample": card}, extra_files=(path / CARD,)
    )
