"""The family registry: one description per Hugging Face model_type, each in its own file.

Adding a family is one new file (a base.Family subclass) and its class in FAMILY_CLASSES.
Torch-free at import (the CLI lists SUPPORTED in its help).
"""

from __future__ import annotations

from pathlib import Path

from gptdeploy.errors import SourceError
from gptdeploy.exporters.sources.families import gpt2, gpt_neox, llama, mistral, qwen2, qwen3
from gptdeploy.exporters.sources.families.base import Family

FAMILY_CLASSES: tuple[type[Family], ...] = (
    gpt2.GPT2, llama.Llama, mistral.Mistral, qwen2.Qwen2, qwen3.Qwen3, gpt_neox.GPTNeoX,
)
FAMILIES: dict[str, Family] = {t: cls() for cls in FAMILY_CLASSES for t in cls.model_types}
SUPPORTED = ", ".join(sorted(FAMILIES))


def family_for(hf: dict, where: Path) -> Family:
    """The description of config.json's model_type; anything else is refused, never guessed."""
    kind = hf.get("model_type")
    if kind is None:
        raise SourceError(f"{where} has no model_type; supported: {SUPPORTED}")
    family = FAMILIES.get(kind) if isinstance(kind, str) else None
    if family is None:
        archs = hf.get("architectures")
        named = f"{kind!r}" + (f" ({', '.join(map(str, archs))})" if isinstance(archs, list) and archs else "")
        raise SourceError(f"{where}: architecture {named} is not supported; supported: {SUPPORTED}")
    return family


__all__ = ["FAMILIES", "SUPPORTED", "Family", "family_for"]
