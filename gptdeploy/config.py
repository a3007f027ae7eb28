"""The canonical model configuration: nanoGPT's names, torch-free (the runtime reads it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gptdeploy.errors import ConfigError

GELU_KINDS = ("tanh", "exact")


@dataclass(frozen=True)
class GPTConfig:
    """Dimensions and numerics of a GPT-2-family decoder.

    Foreign names (`num_hidden_layers`, `hidden_size`, ...) are mapped to these in the
    source loaders and nowhere else.
    """

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int  # rows of the embedding; may exceed the tokenizer's (nanoGPT pads to 50304)
    block_size: int  # maximum context, in positions
    n_kv_head: int | None = None  # grouped-query attention; None means n_head
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    bias: bool = True  # biases on Linear and LayerNorm (nanoGPT's bias=False drops both)
    layer_norm_eps: float = 1e-5
    gelu: str = "tanh"  # "tanh": HF GPT-2's gelu_new; "exact": nanoGPT's nn.GELU()
    scale_attn_by_inverse_layer_idx: bool = False  # HF GPT-2 option: scores / (layer + 1)

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.n_embd % self.n_head:
            problems.append(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not problems and self.n_head % self.kv_heads:
            problems.append(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if self.gelu not in GELU_KINDS:
            problems.append(f"gelu must be one of {', '.join(GELU_KINDS)}, got {self.gelu!r}")
        if not (isinstance(self.layer_norm_eps, float) and 0 < self.layer_norm_eps < 1):
            problems.append(f"layer_norm_eps must be a small positive float, got {self.layer_norm_eps!r}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config fields: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"invalid model config: {exc}") from None
