"""gptdeploy's own trained samples: an HF directory of any supported family (samples/tiny-gpt is
GPT-2, samples/tiny-llama Llama) that also holds a sample.json card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from gptdeploy.exporters.sources import files, hf

if TYPE_CHECKING:
    from gptdeploy.exporters.sources.base import Source

KIND = "sample"
DESCRIPTION = "gptdeploy sample (an HF directory of a supported family with a sample.json card)"

CARD = "sample.json"
FORMAT = "gptdeploy-sample"


def detect(path: Path) -> bool:
    if not (path.is_dir() and (path / CARD).is_file()):
        return False
    try:
        card = json.loads((path / CARD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # not ours; the HF loader may still take the directory
    return isinstance(card, dict) and card.get("format") == FORMAT


def load(path: Path, tokenizer: Path | None = None) -> Source:
    card = files.read_json(path / CARD)
    return hf.load_dir(path, tokenizer, kind=KIND, fmt=DESCRIPTION, extra={"sample": card}, extra_files=(path / CARD,))
