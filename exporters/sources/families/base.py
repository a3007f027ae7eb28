"""What a family description is: how one Hugging Face model_type maps onto the canonical decoder.

The shape of llama.cpp's HF converter: one small class per family, registered by the HF
model_type names it handles (families/__init__.py). This base class holds the shared mapping,
Llama's, which most families share; a family overrides only what differs (a name, a bias, the
window, a fused-QKV layout). Every method here is complete, so a family can never reach a
"not implemented" at export time. Torch-free at import: torch arrives in `state`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from gptdeploy.config import GPTConfig
from gptdeploy.errors import ConfigError, SourceError
from gptdeploy.exporters.sources.families import hf_rope

if TYPE_CHECKING:
    import torch

# transformers' ACT2FN names -> canonical GELU kind. gelu_fast is the tanh formula with
# sqrt(2/pi) rounded to 0.7978845608 (relative difference ~4e-12), so it is "tanh" too.
GELU = {
    "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_python_tanh": "tanh", "gelu_fast": "tanh",
    "gelu": "exact", "gelu_python": "exact",
}


class Family:
    """The shared mapping (Llama's names and block); the class attributes are the description."""

    name: ClassVar[str] = ""  # the canonical config's `family`
    model_types: ClassVar[tuple[str, ...]] = ()  # config.json "model_type" values it handles
    defaults: ClassVar[dict] = {}  # the HF config class's defaults, for keys a config.json leaves out
    # The block, as GPTConfig switches.
    norm: ClassVar[str] = "rmsnorm"
    mlp: ClassVar[str] = "swiglu"
    qk_norm: ClassVar[bool] = False
    partial_rotary: ClassVar[bool] = False  # honours partial_rotary_factor (GPT-NeoX); else refused
    rotary_pct: ClassVar[float] = 1.0  # the default rotary fraction
    # HF tensor names without `prefix`: canonical module -> HF module, or HF modules whose rows
    # are concatenated in order (one GEMM instead of three, or two).
    prefix: ClassVar[str] = "model."  # dropped when present (some saves have no prefix)
    top: ClassVar[dict[str, str]] = {"wte": "embed_tokens", "ln_f": "norm", "lm_head": "lm_head"}
    layer: ClassVar[str] = "layers.{i}."
    blocks: ClassVar[dict[str, str | tuple[str, ...]]] = {
        "ln_1": "input_layernorm",
        "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn.q_norm": "self_attn.q_norm",
        "attn.k_norm": "self_attn.k_norm",
        "attn.c_proj": "self_attn.o_proj",
        "ln_2": "post_attention_layernorm",
        "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.c_proj": "mlp.down_proj",
    }
    ignored: ClassVar[re.Pattern] = re.compile(r".*rotary_emb\.inv_freq")  # buffers of older saves

    # ------------------------------------------------------------------------------ config

    def config(self, hf: dict, where: Path) -> GPTConfig:
        """config.json -> GPTConfig; anything the canonical module cannot run is refused."""
        get = self._getter(hf)
        heads, hidden = get("num_attention_heads"), get("hidden_size")
        head_dim = get("head_dim") or (hidden // heads if _ints(hidden, heads) else None)
        window, layers = self.window(hf, get, where)
        fields = dict(
            n_layer=get("num_hidden_layers"), n_head=heads, n_embd=hidden, vocab_size=get("vocab_size"),
            block_size=get("max_position_embeddings"), n_kv_head=get("num_key_value_heads") or heads,
            n_inner=get("intermediate_size"), bias=False, layer_norm_eps=_float(self.eps(get)),
            family=self.name, head_size=head_dim, norm=self.norm, mlp=self.mlp, qk_norm=self.qk_norm,
            rope=hf_rope.rope(hf, head_dim, where, partial=self.partial_rotary, pct=self.rotary_pct,
                              max_positions=get("max_position_embeddings")),
            sliding_window=window, window_layers=layers, tie_word_embeddings=bool(get("tie_word_embeddings")),
        )
        fields.update(self.block(hf, get, where))
        try:
            return GPTConfig(**fields)
        except ConfigError as exc:
            raise SourceError(f"{where}: {exc}") from None

    def block(self, hf: dict, get, where: Path) -> dict:
        """The block's other switches, by GPTConfig field: activation, biases (Llama: attention_bias
        on q, k, v and o; mlp_bias on the MLP), residual form."""
        self.require_silu(get, where)
        attn = bool(get("attention_bias"))
        return {"qkv_bias": attn, "attn_proj_bias": attn, "mlp_bias": bool(get("mlp_bias"))}

    def window(self, hf: dict, get, where: Path) -> tuple[int | None, tuple[int, ...] | None]:
        """(sliding_window, the layers that use it; None: every layer). Llama has none."""
        return None, None

    def eps(self, get) -> float:
        return get("rms_norm_eps")

    def require_silu(self, get, where: Path) -> None:
        act = get("hidden_act")
        if act != "silu":
            raise SourceError(f"{where}: hidden_act {act!r} is not supported for {self.name}; supported: silu")

    def _getter(self, hf: dict):
        return lambda key: hf[key] if key in hf else self.defaults.get(key)

    # ------------------------------------------------------------------------------ weights

    def names(self, config: GPTConfig) -> dict[str, tuple[str, ...]]:
        """Canonical parameter -> the HF tensors (without prefix) it is made of, for every module."""
        modules = {k: (v,) for k, v in self.top.items()}
        for i in range(config.n_layer):
            for canon, hf in self.blocks.items():
                parts = hf if isinstance(hf, tuple) else (hf,)
                modules[f"h.{i}.{canon}"] = tuple(self.layer.format(i=i) + p for p in parts)
        return {f"{m}.{kind}": tuple(f"{p}.{kind}" for p in parts)
                for m, parts in modules.items() for kind in ("weight", "bias")}

    def convert(self, name: str, t: torch.Tensor, config: GPTConfig) -> torch.Tensor:
        """A tensor in the canonical layout (GPT-2 transposes Conv1D, GPT-NeoX de-interleaves its QKV)."""
        return t

    def state(self, raw: dict[str, torch.Tensor], config: GPTConfig, where: Path) -> dict[str, torch.Tensor]:
        """HF names -> canonical names, float32 (bf16 and fp16 upcast exactly). Consumes `raw`, so
        each stored tensor is freed once converted (peak: the fp32 state plus what is left of `raw`).
        Tensors nothing maps are kept under their own names: the strict load reports them as unexpected."""
        import torch

        for k in list(raw):
            v = raw.pop(k)
            if not self.ignored.fullmatch(k):
                raw[k.removeprefix(self.prefix)] = v
        state = {}
        for canon, parts in self.names(config).items():
            found = [p for p in parts if p in raw]
            if not found:
                continue  # the strict load names what is missing
            if len(found) != len(parts):
                missing = sorted(set(parts) - set(found))
                raise SourceError(f"{where}: has {found[0]} but not {', '.join(missing)}; is a shard missing?")
            t = torch.cat([raw.pop(p) for p in parts]) if len(parts) > 1 else raw.pop(parts[0])
            state[canon] = self.convert(canon, t, config).float().contiguous()
        state.update({k: v.float() for k, v in raw.items()})
        head = state.pop("lm_head.weight", None) if config.tie_word_embeddings else None
        if head is not None and "wte.weight" in state and not torch.equal(head, state["wte.weight"]):
            raise SourceError(
                f"{where}: {self.top['lm_head']}.weight differs from the token embedding, but config.json "
                "says tie_word_embeddings=true (transformers would ignore it); set tie_word_embeddings "
                "to false if the head was trained on its own"
            )
        return state


def _ints(*values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def _float(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
