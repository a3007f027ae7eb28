"""The canonical model configuration: nanoGPT's names, torch-free (the runtime reads it).

One decoder (gptdeploy/modeling.py) with switches; every family (GPT-2, nanoGPT, Llama, Mistral,
Qwen2/3, GPT-NeoX) is a setting of them. Foreign names (`num_hidden_layers`, `hidden_size`,
`rope_parameters`, ...) are mapped to these in the source loaders and nowhere else. Manifests
written before the switches existed hold only the GPT-2 fields; the defaults are GPT-2's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gptdeploy.errors import ConfigError

GELU_KINDS = ("tanh", "exact")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")  # "gelu": c_fc -> GELU -> c_proj; "swiglu": c_fc = gate|up, silu(gate) * up
ROPE_SCALINGS = ("default", "linear", "llama3")  # transformers' rope_type names


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding: the inverse frequencies transformers' modeling_rope_utils makes."""

    theta: float = 10000.0
    dim: int | None = None  # rotated dims per head (GPT-NeoX's partial rotary); None: all of head_dim
    scaling: str = "default"  # "linear": frequencies / factor; "llama3": Llama 3.1's three bands
    factor: float = 1.0  # linear, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_positions: int | None = None  # llama3: the context the model was pretrained with

    def problems(self, head_dim: int) -> list[str]:
        out = []
        if self.scaling not in ROPE_SCALINGS:
            out.append(f"rope scaling must be one of {', '.join(ROPE_SCALINGS)}, got {self.scaling!r}")
        if not (_number(self.theta) and self.theta > 1):
            out.append(f"rope theta must be a number > 1, got {self.theta!r}")
        if self.dim is not None and not (_count(self.dim) and self.dim % 2 == 0 and self.dim <= head_dim):
            out.append(f"rope dim must be an even positive integer <= head size {head_dim}, got {self.dim!r}")
        if self.dim is None and head_dim % 2:
            out.append(f"rope needs an even head size, got {head_dim}")
        if self.scaling != "default" and not (_number(self.factor) and self.factor > 0):
            out.append(f"rope factor must be a positive number, got {self.factor!r}")
        if self.scaling == "llama3":
            if not _count(self.original_max_positions):
                out.append(f"llama3 rope needs original_max_positions, got {self.original_max_positions!r}")
            if not (_number(self.low_freq_factor) and _number(self.high_freq_factor)
                    and 0 < self.low_freq_factor < self.high_freq_factor):
                out.append("llama3 rope needs 0 < low_freq_factor < high_freq_factor, got "
                           f"{self.low_freq_factor!r}, {self.high_freq_factor!r}")
        return out


@dataclass(frozen=True)
class GPTConfig:
    """Dimensions, block layout and numerics of one decoder-only transformer."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int  # rows of the embedding; may exceed the tokenizer's (nanoGPT pads to 50304)
    block_size: int  # maximum context, in positions
    n_kv_head: int | None = None  # grouped-query attention; None means n_head
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    bias: bool = True  # the default of every bias below (nanoGPT's bias=False drops them all)
    layer_norm_eps: float = 1e-5  # epsilon of every norm, LayerNorm or RMSNorm
    gelu: str = "tanh"  # "tanh": HF GPT-2's gelu_new; "exact": nanoGPT's nn.GELU() (mlp "gelu" only)
    scale_attn_by_inverse_layer_idx: bool = False  # HF GPT-2 option: scores / (layer + 1)
    family: str = "gpt2"  # the family description that made this config (a record: the switches decide)
    head_size: int | None = None  # per-head width; None means n_embd // n_head (Qwen3 sets its own)
    norm: str = "layernorm"
    mlp: str = "gelu"
    rope: Rope | None = None  # rotary positions; None: a learned position embedding (wpe)
    qkv_bias: bool | None = None  # None: `bias`; resolved on construction, so readers see a bool
    attn_proj_bias: bool | None = None
    mlp_bias: bool | None = None
    norm_bias: bool | None = None
    qk_norm: bool = False  # RMSNorm over each head's q and k before the rotary (Qwen3)
    parallel_residual: bool = False  # x + attn(ln_1(x)) + mlp(ln_2(x)) (GPT-NeoX)
    sliding_window: int | None = None  # a query sees itself and the window - 1 positions before it
    window_layers: tuple[int, ...] | None = None  # layers with the window; None: all (Qwen2's max_window_layers)
    tie_word_embeddings: bool = True  # False: a separate lm_head.weight (V, C)

    def __post_init__(self) -> None:
        for name in ("qkv_bias", "attn_proj_bias", "mlp_bias", "norm_bias"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.bias)
        if isinstance(self.window_layers, list):  # from JSON
            object.__setattr__(self, "window_layers", tuple(self.window_layers))
        problems = self._problems()
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            value = getattr(self, name)
            if not _count(value):
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if problems:
            return problems
        if self.head_size is None and self.n_embd % self.n_head:
            problems.append(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.head_size is not None and not _count(self.head_size):
            problems.append(f"head_size must be a positive integer, got {self.head_size!r}")
        if self.n_kv_head is not None and not _count(self.n_kv_head):
            problems.append(f"n_kv_head must be a positive integer, got {self.n_kv_head!r}")
        elif self.n_head % self.kv_heads:
            problems.append(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        for name, kinds in (("gelu", GELU_KINDS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in kinds:
                problems.append(f"{name} must be one of {', '.join(kinds)}, got {getattr(self, name)!r}")
        if not (isinstance(self.layer_norm_eps, float) and 0 < self.layer_norm_eps < 1):
            problems.append(f"layer_norm_eps must be a small positive float, got {self.layer_norm_eps!r}")
        if self.rope is not None and not problems:
            problems += self.rope.problems(self.head_dim)
        if self.sliding_window is not None and not _count(self.sliding_window):
            problems.append(f"sliding_window must be a positive integer, got {self.sliding_window!r}")
        bad = [i for i in self.window_layers or () if not (isinstance(i, int) and 0 <= i < self.n_layer)]
        if bad:
            problems.append(f"window_layers must be layer indices below {self.n_layer}, got {bad[:4]}")
        if not (isinstance(self.family, str) and self.family):
            problems.append(f"family must be a name, got {self.family!r}")
        return problems

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def attention_scale(self, layer: int) -> float:
        """What layer `layer`'s attention scores are multiplied by before the softmax."""
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1  # HF GPT-2's option, used by some fine-tunes for fp16 stability
        return scale

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def rotary_dim(self) -> int:
        """Dims of each head the rotary turns (0 with learned positions)."""
        return 0 if self.rope is None else (self.rope.dim or self.head_dim)

    def windowed(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window."""
        return self.sliding_window is not None and (self.window_layers is None or layer in self.window_layers)

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
        data = dict(data)
        if isinstance(data.get("rope"), dict):
            data["rope"] = _rope_from_dict(data["rope"])
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"invalid model config: {exc}") from None


def _rope_from_dict(data: dict) -> Rope:
    known = {f.name for f in dataclasses.fields(Rope)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown rope config fields: {', '.join(unknown)}")
    return Rope(**data)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
