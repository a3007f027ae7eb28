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
    """A separate lm_head must be the token embedding itself (tied); gptdeploy exports it tied."""
    if lm_head is not None and (lm_head.shape != wte.shape or not torch.equal(lm_head.float(), wte.float())):
        raise SourceError(
            f"{where}: lm_head.weight differs from the token embedding; untied lm_head is not supported yet"
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
