"""Source loaders: a plain registry, first match wins. Importing this stays torch-free (the CLI
reads SUPPORTED for its help); torch arrives when a loader's load() runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gptdeploy.errors import SourceError
from gptdeploy.exporters.sources import hf, nanogpt, sample

if TYPE_CHECKING:
    from gptdeploy.exporters.sources.base import Source

# Order matters: a sample directory is also an HF directory, so sample is asked first.
LOADERS = (sample, hf, nanogpt)
SUPPORTED = "; ".join(f"{m.KIND}: {m.DESCRIPTION}" for m in LOADERS)


def load_source(path: Path, tokenizer: Path | None = None) -> Source:
    """Load a checkpoint or model directory with the first loader that recognises it."""
    path = _resolve(path)
    if not path.exists():
        raise SourceError(f"{path} does not exist; pass a model directory or checkpoint file")
    if path.is_dir() and not any(path.iterdir()):
        raise SourceError(f"{path} is an empty directory; pass a model directory or checkpoint file")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise SourceError(f"--tokenizer {tokenizer} does not exist")
    for loader in LOADERS:
        if loader.detect(path):
            return loader.load(path, Path(tokenizer) if tokenizer is not None else None)
    raise SourceError(f"{path} is not a supported source. Supported: {SUPPORTED}")


def _resolve(spec) -> Path:
    """SOURCE as a local path: an existing path as is; a hub id ("org/name[@revision]") as the local
    snapshot directory hub.resolve finds or downloads, which the loaders then read like any other."""
    from gptdeploy.exporters.sources import hub  # torch-free

    path = Path(spec)
    if not path.exists() and hub.looks_like_hub_id(str(spec)):
        return hub.resolve(str(spec))
    return path


__all__ = ["LOADERS", "SUPPORTED", "load_source"]
