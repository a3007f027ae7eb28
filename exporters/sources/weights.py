"""Reading weight files without executing them, and checking a canonical state against its config."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gptdeploy.config import GPTConfig
from gptdeploy.errors import SourceError
from gptdeploy.modeling import GPT, load_state


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SourceError(
            f"{path} is truncated or not a safetensors file ({_one_line(exc)}); re-download or re-save it"
        ) from None


def read_torch(path: Path) -> object:
    """torch.load with weights_only=True, never without: tensors and plain containers only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as exc:  # torch raises UnpicklingError, RuntimeError, OSError, EOFError, ... on bad files
        message = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", message)
        if found and "Weights only load failed" in message:
            raise SourceError(
                f"{path} contains objects that are not allowed in a weights file ({found.group(1)}): "
                "loading it would execute code. Re-save only the state dict and plain values "
                "(e.g. torch.save({'model': model.state_dict(), ...}))"
            ) from None
        # torch wraps the unpickler's one useful line in a paragraph about weights_only; keep the line.
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", message, re.DOTALL)
        detail = _one_line(exc)[:200] if detail is None else " ".join(detail.group(1).split())[:200]
        raise SourceError(
            f"{path} is truncated, corrupt or not a PyTorch checkpoint ({detail}); "
            "re-copy it from the training machine"
        ) from None


SAFETENSORS = "model.safetensors"
PYTORCH_BIN = "pytorch_model.bin"
INDEX = ".index.json"  # model.safetensors.index.json: {"weight_map": {tensor: shard file}}


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """An HF directory's weights, in their stored dtype, and the files read: model.safetensors,
    sharded safetensors (model.safetensors.index.json), pytorch_model.bin, or sharded .bin."""
    for name in (SAFETENSORS, PYTORCH_BIN):
        if (path / name).is_file():
            return _read_one(path / name), [path / name]
        if (path / (name + INDEX)).is_file():
            return _read_shards(path, path / (name + INDEX))
    raise SourceError(
        f"{path} has no weights: expected {SAFETENSORS} or {PYTORCH_BIN} (or a sharded {SAFETENSORS}{INDEX})"
    )


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        return read_safetensors(path)
    raw = read_torch(path)
    if not is_state_dict(raw):
        raise SourceError(f"{path} is not a state dict (name -> tensor); re-save it with save_pretrained")
    return raw


def _read_shards(root: Path, index: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Every shard the index names, each inside `root` and holding the tensors it is said to."""
    from gptdeploy.exporters.sources.files import read_json

    weight_map = read_json(index).get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
        raise SourceError(f"{index} has no weight_map (tensor name -> shard file); re-save the model")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        # A shard is a file name beside the index: no "../", no absolute path, no subdirectory. (Not
        # a resolved-path check: the hub cache's snapshot files are symlinks into its blob store.)
        if Path(shard).name != shard or shard in (".", "..") or "\\" in shard:
            raise SourceError(f"{index} names shard {shard!r}, which is outside {root}; refusing to read it")
        if not (root / shard).is_file():
            raise SourceError(f"{index} names shard {shard!r}, which is missing from {root}; copy every shard")
    raw: dict[str, torch.Tensor] = {}
    for shard in shards:
        raw.update(_read_one(root / shard))
    absent = sorted(k for k in weight_map if k not in raw)
    if absent:
        raise SourceError(f"{index} lists {', '.join(absent[:3])} but no shard holds it; re-save the model")
    return raw, [index, *(root / s for s in shards)]


def is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def check_state(config: GPTConfig, state: dict[str, torch.Tensor]) -> None:
    """SourceError (via modeling.load_state, so messages match) if names or shapes disagree with config."""
    with torch.device("meta"):  # shapes only: no memory for a second copy of the weights
        model = GPT(config)
    load_state(model, {k: v.to("meta") for k, v in state.items()})


def untie_check(wte: torch.Tensor, lm_head: torch.Tensor | None, where: Path) -> None:
    """nanoGPT's model.py always ties lm_head to wte: a checkpoint whose two differ is damaged."""
    if lm_head is not None and (lm_head.shape != wte.shape or not torch.equal(lm_head.float(), wte.float())):
        raise SourceError(
            f"{where}: lm_head.weight differs from the token embedding, which nanoGPT's model.py ties "
            "to it (untied lm_head is not supported for nanoGPT checkpoints); re-save it from train.py"
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
