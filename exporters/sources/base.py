"""What every source loader returns, and the reference-forward protocol parity runs against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from gptdeploy.config import GPTConfig


@dataclass
class ReferenceOutput:
    """The source framework's own forward over a whole sequence, no cache.

    logits (B, S, V); keys/values per layer (B, nkv, S, hs); attentions per layer (B, nh, S, S).
    """

    logits: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    attentions: list[torch.Tensor]


class Reference(Protocol):
    """Runs the source framework's forward (HF transformers eager, or nanoGPT math written
    independently of gptdeploy.modeling) on full sequences: (B, S) ids, mask and positions."""

    name: str  # e.g. "transformers 5.24.0 LlamaForCausalLM (eager attention)"

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> ReferenceOutput: ...


@dataclass
class Tokenizer:
    """A `tokenizers` JSON and its special tokens, ready to copy into a bundle."""

    json: str  # contents of tokenizer.json
    vocab_size: int
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)  # every EOS id, eos_token_id first
    add_bos_token: bool = False  # gptdeploy must prepend BOS (tokenizer.json's post-processor does not)
    chat_template: str | None = None  # Jinja source (tokenizer_config.json or chat_template.jinja)
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as text
    settings_files: list[Path] = field(default_factory=list)  # tokenizer_config.json etc. read, for the description


@dataclass
class Source:
    """A loaded checkpoint mapped to the canonical layout (gptdeploy.modeling.GPT state-dict names)."""

    kind: str  # "hf-<model_type>" ("hf-gpt2", "hf-llama", ...), "nanogpt", "sample"
    path: Path
    config: GPTConfig
    state: dict[str, torch.Tensor]  # canonical names, float32; lm_head.weight only when untied
    tokenizer: Tokenizer
    reference: Callable[[], Reference]  # builds the source framework's own forward, lazily
    description: dict = field(default_factory=dict)  # name, files with sha256: goes in the manifest
