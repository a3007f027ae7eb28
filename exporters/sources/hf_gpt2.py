"""Hugging Face GPT-2 directories: config.json + model.safetensors (or pytorch_model.bin) + tokenizer."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING

from gptdeploy.config import GPTConfig
from gptdeploy.errors import ConfigError, SourceError
from gptdeploy.exporters.sources import files, tokenizer_files

if TYPE_CHECKING:
    from gptdeploy.exporters.sources.base import Source

KIND = "hf-gpt2"
DESCRIPTION = "Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin)"

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SAFETENSORS = "model.safetensors"
PYTORCH_BIN = "pytorch_model.bin"
SUPPORTED_ARCHITECTURES = "gpt2 (the GPT-2 family)"

# transformers' ACT2FN names -> canonical GELU kind. gelu_fast is the tanh formula with
# sqrt(2/pi) rounded to 0.7978845608 (relative difference ~4e-12), so it is "tanh" too.
_GELU = {
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_python_tanh": "tanh",
    "gelu_fast": "tanh",
    "gelu": "exact",
    "gelu_python": "exact",
}
# GPT2Config's defaults, used for keys a config.json leaves out (transformers does the same).
_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
}
# HF GPT-2 keeps these four as Conv1D, weight (in, out); the canonical module is nn.Linear (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers of older saves


def detect(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def load(path: Path, tokenizer: Path | None = None) -> Source:
    return load_dir(path, tokenizer, kind=KIND, fmt=DESCRIPTION)


def load_dir(
    path: Path,
    tokenizer: Path | None,
    *,
    kind: str,
    fmt: str,
    extra: dict | None = None,
    extra_files: tuple[Path, ...] = (),
) -> Source:
    """Load an HF GPT-2 directory as `kind`; `extra` joins the description (the sample card)."""
    from gptdeploy.exporters.sources import weights
    from gptdeploy.exporters.sources.base import Source

    hf = files.read_json(path / CONFIG)
    config = config_from_hf(hf, path / CONFIG)
    weight_file = _weight_file(path)
    raw = weights.read_safetensors(weight_file) if weight_file.name == SAFETENSORS else _read_bin(weight_file)
    state, lm_head = to_canonical(raw, weight_file)
    try:
        weights.check_state(config, state)
    except SourceError as exc:
        raise SourceError(f"{path}: {exc}; check {CONFIG} against the weights") from None
    weights.untie_check(state["wte.weight"], lm_head, weight_file)

    settings, read = [hf], [path / CONFIG, weight_file, *extra_files]
    if (path / GENERATION_CONFIG).is_file():
        settings.append(files.read_json(path / GENERATION_CONFIG))
        read.append(path / GENERATION_CONFIG)
    found = (
        tokenizer_files.from_argument(tokenizer) if tokenizer is not None else tokenizer_files.from_dir(path)
    )
    if found is None:
        raise SourceError(
            f"{path} has no tokenizer: add tokenizer.json (or vocab.json + merges.txt) to it, "
            "or pass --tokenizer"
        )
    text, tok_files = found
    tok = tokenizer_files.make_tokenizer(text, config.vocab_size, settings, path)
    description = files.describe(
        path, path.resolve().name, fmt, read + tok_files, [path / CONFIG, weight_file]
    )
    description.update(extra or {})
    return Source(
        kind=kind,
        path=path,
        config=config,
        state=state,
        tokenizer=tok,
        reference=functools.partial(_reference, path),
        description=description,
    )


def config_from_hf(hf: dict, where: Path) -> GPTConfig:
    """Map GPT2Config's names to the canonical GPTConfig; refuse what the canonical module cannot run."""
    arch = hf.get("model_type")
    if arch != "gpt2":
        named = f"{arch!r}" + (
            f" ({', '.join(map(str, hf['architectures']))})" if hf.get("architectures") else ""
        )
        raise SourceError(
            f"{where}: architecture {named} is not supported; supported: {SUPPORTED_ARCHITECTURES}"
        )
    if hf.get("scale_attn_weights", True) is False:
        raise SourceError(f"{where}: scale_attn_weights=false (unscaled attention scores) is not supported")
    if hf.get("add_cross_attention", False):
        raise SourceError(
            f"{where}: add_cross_attention=true (an encoder-decoder GPT-2) is not supported; "
            "gptdeploy exports decoder-only models"
        )
    if hf.get("tie_word_embeddings", True) is False:
        raise SourceError(f"{where}: tie_word_embeddings=false (untied lm_head) is not supported yet")
    get = {k: hf.get(k, d) for k, d in _DEFAULTS.items()}
    act = get["activation_function"]
    if act not in _GELU:
        raise SourceError(
            f"{where}: activation_function {act!r} is not supported; supported: {', '.join(_GELU)}"
        )
    eps = get["layer_norm_epsilon"]
    try:
        return GPTConfig(
            n_layer=get["n_layer"],
            n_head=get["n_head"],
            n_embd=get["n_embd"],
            vocab_size=get["vocab_size"],
            block_size=get["n_positions"],
            n_inner=get["n_inner"],
            bias=True,
            layer_norm_eps=float(eps) if isinstance(eps, (int, float)) else eps,
            gelu=_GELU[act],
            scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
        )
    except ConfigError as exc:
        raise SourceError(f"{where}: {exc}") from None


def to_canonical(raw: dict, where: Path) -> tuple[dict, object]:
    """HF names -> canonical names, Conv1D transposed, float32; returns (state, lm_head or None)."""
    state, lm_head = {}, None
    for name, t in raw.items():
        n = name.removeprefix("transformer.")
        if n == "lm_head.weight":
            lm_head = t
        elif not _MASK_BUFFER.fullmatch(n):
            t = t.t() if n.endswith(_CONV1D) and t.ndim == 2 else t  # (in, out) -> (out, in)
            state[n] = t.float().contiguous()
    if "wte.weight" not in state:
        raise SourceError(
            f"{where} has no token embedding (transformer.wte.weight); is it a GPT-2 checkpoint?"
        )
    return state, lm_head


def _weight_file(path: Path) -> Path:
    for name in (SAFETENSORS, PYTORCH_BIN):
        if (path / name).is_file():
            return path / name
    if any(path.glob("*.index.json")):
        raise SourceError(
            f"{path} holds a sharded checkpoint, which is not supported yet; "
            "re-save it as one file (save_pretrained(..., max_shard_size='100GB'))"
        )
    raise SourceError(f"{path} has no weights: expected {SAFETENSORS} or {PYTORCH_BIN}")


def _read_bin(path: Path) -> dict:
    from gptdeploy.exporters.sources import weights

    raw = weights.read_torch(path)
    if not weights.is_state_dict(raw):
        raise SourceError(f"{path} is not a state dict (name -> tensor); re-save it with save_pretrained")
    return raw


def _reference(path: Path):
    from gptdeploy.exporters.references import HFReference

    return HFReference(path)
