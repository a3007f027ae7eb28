"""Files that let other runtimes load a bundle as it is, written beside gptdeploy.json.

- `config.json` + `generation_config.json`: Hugging Face's description of the model and of its
  generation defaults. Optimum's `ORTModelForCausalLM.from_pretrained(BUNDLE)` reads them
  (optimum/onnxruntime/modeling_decoder.py: model_type, heads and hidden size shape the empty KV
  cache of the first step; the generation config's EOS ids end `generate`) and runs `model.onnx`,
  whose IO names are the ones Optimum's own exporter uses (gptdeploy/contract.py).
- `genai_config.json`: onnxruntime-genai's sidecar (src/config.h; written as its model builder's
  make_genai_config writes it): IO names, heads, EOS ids, context and the model type.

Every file is listed with its SHA-256 like any bundle file; what was done with each (copied,
written, skipped and why) is recorded in the manifest under `source.interop`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gptdeploy import contract as io
from gptdeploy.config import GPTConfig
from gptdeploy.contract import GraphSignature

if TYPE_CHECKING:
    from gptdeploy.exporters.sources.base import Source
    from gptdeploy.manifest import TokenizerEntry

log = logging.getLogger(__name__)

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
GENAI_CONFIG = "genai_config.json"

# Canonical family -> onnxruntime-genai model type (src/models/model_type.h, ModelType::IsLLM).
# Its own "gpt2" type runs Gpt_Model, which expects one stacked `past_%d` per layer
# (CombinedKeyValueCache); gptdeploy's graphs keep key and value apart, which is what its generic
# decoder-only type "decoder" runs (DecoderOnly_Model, DefaultKeyValueCache). GPT-NeoX has no type
# of its own there; the rotary, window and residual form live inside the graph, so "decoder" runs it.
GENAI_TYPES = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
    "gpt2": "decoder", "gpt_neox": "decoder",
}
GELU_NAMES = {"tanh": "gelu_new", "exact": "gelu"}  # canonical GELU -> transformers' ACT2FN name


@dataclass
class InteropFiles:
    files: list[str] = field(default_factory=list)  # written into the bundle, to be listed with their SHA-256
    notes: dict[str, str] = field(default_factory=dict)  # file -> what was done, or why it was skipped


def write_interop_files(
    source: Source, directory: Path, tok: TokenizerEntry, graph_file: str, sig: GraphSignature
) -> InteropFiles:
    """Write config.json, generation_config.json and genai_config.json into `directory` (the bundle
    being built) where they can describe the model."""
    out = InteropFiles()
    config_text, out.notes[CONFIG] = hf_config_text(source, tok)
    generation, out.notes[GENERATION_CONFIG] = generation_config(source, tok)
    genai, out.notes[GENAI_CONFIG] = genai_config(source.config, tok, graph_file, sig)
    for name, text in ((CONFIG, config_text), (GENERATION_CONFIG, generation), (GENAI_CONFIG, genai)):
        if text is not None:
            (directory / name).write_text(text if isinstance(text, str) else _json(text), encoding="utf-8")
            out.files.append(name)
    return out


# ------------------------------------------------------------------------------ config.json


def _source_file(source: Source, name: str) -> Path | None:
    """`name` in the source directory when the loader read it (it is among the described files)."""
    path = Path(source.path)
    read = source.description.get("files", {})
    return path / name if path.is_dir() and name in read and (path / name).is_file() else None


def hf_config_text(source: Source, tok: TokenizerEntry) -> tuple[str | None, str]:
    """The source's own config.json, byte for byte; else (nanoGPT) an HF GPT-2 config that
    describes the canonical model, when GPT-2 can; else None and why."""
    own = _source_file(source, CONFIG)
    if own is not None:
        return own.read_text(encoding="utf-8"), "copied from the source"
    described = gpt2_config(source.config, tok)
    if isinstance(described, str):
        return None, f"skipped: no Hugging Face model type describes this model ({described})"
    note = "written: an HF GPT-2 config describing the canonical model"
    if not all((source.config.qkv_bias, source.config.attn_proj_bias, source.config.mlp_bias,
                source.config.norm_bias)):
        note += " (GPT-2 has every bias; those the source lacks are zero)"
    return _json(described), note


def gpt2_config(cfg: GPTConfig, tok: TokenizerEntry) -> dict | str:
    """transformers' GPT2Config fields for `cfg`, or what GPT-2 cannot express. A missing bias is
    GPT-2's bias at zero, so biases never disqualify (nanoGPT's bias=False is the usual case)."""
    misfits = [why for bad, why in (
        (cfg.norm != "layernorm", f"{cfg.norm} norms"),
        (cfg.mlp != "gelu", f"a {cfg.mlp} MLP"),
        (cfg.rope is not None, "rotary positions"),
        (cfg.qk_norm, "q/k norms"),
        (cfg.parallel_residual, "a parallel residual"),
        (cfg.sliding_window is not None, "a sliding window"),
        (not cfg.tie_word_embeddings, "an untied head"),
        (cfg.kv_heads != cfg.n_head, "grouped-query attention"),
        (cfg.head_dim * cfg.n_head != cfg.n_embd, "a head size of its own"),
    ) if bad]
    if misfits:
        return "GPT-2 has no " + ", ".join(misfits)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_inner": cfg.n_inner,
        "n_positions": cfg.block_size,
        "vocab_size": cfg.vocab_size,
        "activation_function": GELU_NAMES[cfg.gelu],
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
        "tie_word_embeddings": True,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "use_cache": True,
    }


# --------------------------------------------------------------------- generation_config.json


def generation_config(source: Source, tok: TokenizerEntry) -> tuple[str | None, str]:
    """The source's generation_config.json, with its EOS ids made the bundle's stop ids (every id
    gptdeploy stops on: tokenizer_config.json's eos_token may add one), so that Optimum's generate
    ends where gptdeploy's does; without one, written from the bundle's tokenizer settings."""
    from gptdeploy.exporters.sources import files

    stops = list(tok.stop_ids)
    own = _source_file(source, GENERATION_CONFIG)
    if own is None:
        settings = {"bos_token_id": tok.bos_token_id, "eos_token_id": stops or None, "pad_token_id": tok.pad_token_id}
        return _json({k: v for k, v in settings.items() if v is not None}), (
            "written from the bundle's tokenizer settings (the source has none)")
    data = files.read_json(own)
    theirs = data.get("eos_token_id")
    theirs = theirs if isinstance(theirs, list) else [] if theirs is None else [theirs]
    if not stops or set(theirs) == set(stops):
        return own.read_text(encoding="utf-8"), "copied from the source"
    data["eos_token_id"] = stops
    return _json(data), f"copied from the source, eos_token_id {theirs} -> {stops} (the ids gptdeploy stops on)"


# ------------------------------------------------------------------------ genai_config.json


def _name_template(name_of) -> str:
    """The contract's per-layer name as onnxruntime-genai's printf template: past_key_values.%d.key."""
    return name_of(0).replace(".0.", ".%d.")


def genai_config(cfg: GPTConfig, tok: TokenizerEntry, graph_file: str, sig: GraphSignature) -> tuple[dict | None, str]:
    """onnxruntime-genai's config for this graph, or None and why. past_present_share_buffer is
    false: the graph returns present = past + new positions, which genai's CPU cache concatenates."""
    kind = GENAI_TYPES.get(cfg.family)
    if kind is None:
        return None, f"skipped: onnxruntime-genai has no model type for family {cfg.family!r}"
    stops = list(tok.stop_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else 0)
    model = {
        "type": kind,
        "vocab_size": sig.vocab_size,  # the logits' width: embedding rows, not the tokenizer's size
        "context_length": cfg.block_size,
        "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else pad,
        "eos_token_id": stops,
        "pad_token_id": pad,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": graph_file,
            "head_size": sig.head_dim,
            "hidden_size": cfg.n_embd,
            "num_attention_heads": sig.n_head,
            "num_hidden_layers": sig.n_layer,
            "num_key_value_heads": sig.kv_heads,
            "inputs": {
                "input_ids": io.INPUT_IDS,
                "attention_mask": io.ATTENTION_MASK,
                "position_ids": io.POSITION_IDS,
                "past_key_names": _name_template(io.past_key),
                "past_value_names": _name_template(io.past_value),
            },
            "outputs": {
                "logits": io.LOGITS,
                "present_key_names": _name_template(io.present_key),
                "present_value_names": _name_template(io.present_value),
            },
        },
    }
    search = {
        "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": cfg.block_size,
        "min_length": 0, "past_present_share_buffer": False, "repetition_penalty": 1.0,
        "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    }
    note = f"written: model type {kind!r}"
    if kind == "decoder":
        note += (" (onnxruntime-genai's generic decoder-only type: its 'gpt2' type expects one stacked "
                 "past per layer)")
    return {"model": model, "search": search}, note


# ------------------------------------------------------------------------------ the graph


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


__all__ = ["GENAI_TYPES", "InteropFiles", "genai_config", "generation_config",
           "gpt2_config", "hf_config_text", "write_interop_files"]
