"""Hugging Face model directories of every supported family: config.json + weights + tokenizer.

The family description (families/) chosen by config.json's model_type maps the config and the
weights; this module only finds and reads the files. Weights: model.safetensors, sharded
safetensors (model.safetensors.index.json), or pytorch_model.bin (read with weights_only=True);
bf16, fp16 or fp32, upcast to fp32 (a graph is fp16 only when asked for with --fp16).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from gptdeploy.config import GPTConfig
from gptdeploy.errors import SourceError
from gptdeploy.exporters.sources import files, tokenizer_files
from gptdeploy.exporters.sources.families import SUPPORTED as FAMILIES
from gptdeploy.exporters.sources.families import family_for

if TYPE_CHECKING:
    from gptdeploy.exporters.sources.base import Source

KIND = "hf"  # a loaded source's kind names its family: "hf-gpt2", "hf-llama", ...
DESCRIPTION = (
    "Hugging Face model directory (config.json + model.safetensors, sharded safetensors or "
    f"pytorch_model.bin) of a supported family: {FAMILIES}"
)

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"


def detect(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def load(path: Path, tokenizer: Path | None = None) -> Source:
    return load_dir(path, tokenizer, fmt=DESCRIPTION)


def load_dir(
    path: Path,
    tokenizer: Path | None,
    *,
    fmt: str,
    kind: str | None = None,
    extra: dict | None = None,
    extra_files: tuple[Path, ...] = (),
) -> Source:
    """Load an HF directory; `kind` None names it by family ("hf-llama"); `extra` joins the
    description (the sample card)."""
    from gptdeploy.exporters.sources import weights
    from gptdeploy.exporters.sources.base import Source

    hf = files.read_json(path / CONFIG)
    family = family_for(hf, path / CONFIG)
    config = family.config(hf, path / CONFIG)
    raw, weight_files = weights.read_checkpoint(path)
    state = family.state(raw, config, path)  # consumes raw
    try:
        weights.check_state(config, state)
    except SourceError as exc:
        raise SourceError(f"{path}: {exc}; check {CONFIG} against the weights") from None

    settings, read = [hf], [path / CONFIG, *weight_files, *extra_files]
    if (path / GENERATION_CONFIG).is_file():
        settings.append(files.read_json(path / GENERATION_CONFIG))
        read.append(path / GENERATION_CONFIG)
    tok, tok_files = _tokenizer(path, tokenizer, config, settings)
    # Every file the tokenizer came from is the source's too: tokenizer_config.json,
    # special_tokens_map.json and chat_template.jinja (from --tokenizer DIR when given).
    read += [f for f in [*tok_files, *tok.settings_files] if f not in read]
    description = files.describe(path, path.resolve().name, fmt, read, [path / CONFIG, *weight_files])
    description.update(extra or {})
    return Source(
        kind=kind or f"hf-{family.name}",
        path=path,
        config=config,
        state=state,
        tokenizer=tok,
        reference=functools.partial(_reference, path, config.sliding_window is not None),
        description=description,
    )


def _tokenizer(path: Path, given: Path | None, config: GPTConfig, settings: list[dict]):
    """The tokenizer and the files it came from. Its settings (tokenizer_config.json,
    special_tokens_map.json, chat_template.jinja) come from the directory that holds it: the
    model's, or --tokenizer DIR's, whose settings belong to that tokenizer and not to the model's
    own. A --tokenizer FILE brings none, so the model directory's apply."""
    found = tokenizer_files.from_argument(given) if given is not None else tokenizer_files.from_dir(path)
    if found is None:
        raise SourceError(
            f"{path} has no tokenizer: add tokenizer.json (or vocab.json + merges.txt) to it, "
            "or pass --tokenizer"
        )
    text, tok_files = found
    where = given if given is not None and given.is_dir() else path
    return tokenizer_files.make_tokenizer(text, config.vocab_size, settings, where), tok_files


def _reference(path: Path, per_row: bool):
    from gptdeploy.exporters.references import HFReference

    return HFReference(path, per_row=per_row)
