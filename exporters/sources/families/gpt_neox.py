"""GPT-NeoX (Pythia): LayerNorm, a GELU MLP with biases, parallel residual, partial rotary
(`rotary_pct`, 0.25 by default), an untied `embed_out`, and one fused query_key_value projection
whose rows are interleaved per head: [q0 k0 v0 q1 k1 v1 ...], each hs rows."""

from __future__ import annotations

import re
from typing import ClassVar

from gptdeploy.errors import SourceError
from gptdeploy.exporters.sources.families.base import GELU, Family


class GPTNeoX(Family):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    defaults: ClassVar[dict] = {  # GPTNeoXConfig's
        "vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44, "num_attention_heads": 64,
        "intermediate_size": 24576, "hidden_act": "gelu", "max_position_embeddings": 2048,
        "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "use_parallel_residual": True,
        "attention_bias": True,
    }
    norm, mlp = "layernorm", "gelu"
    partial_rotary, rotary_pct = True, 0.25
    prefix = "gpt_neox."
    top: ClassVar[dict[str, str]] = {"wte": "embed_in", "ln_f": "final_layer_norm", "lm_head": "embed_out"}
    blocks: ClassVar[dict] = {
        "ln_1": "input_layernorm",
        "attn.c_attn": "attention.query_key_value",
        "attn.c_proj": "attention.dense",
        "ln_2": "post_attention_layernorm",
        "mlp.c_fc": "mlp.dense_h_to_4h",
        "mlp.c_proj": "mlp.dense_4h_to_h",
    }
    ignored = re.compile(r".*attention\.(bias|masked_bias|rotary_emb\.inv_freq)")  # buffers of older saves

    def eps(self, get) -> float:
        return get("layer_norm_eps")

    def block(self, hf, get, where) -> dict:
        act = get("hidden_act")
        if act not in GELU:
            raise SourceError(f"{where}: hidden_act {act!r} is not supported for gpt_neox; supported: {', '.join(GELU)}")
        attn = bool(get("attention_bias"))
        return {
            "gelu": GELU[act], "bias": True, "qkv_bias": attn, "attn_proj_bias": attn, "mlp_bias": True,
            "norm_bias": True,
            "parallel_residual": bool(get("use_parallel_residual")),
        }

    def convert(self, name, t, config):
        if not name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            return t
        nh, hs = config.n_head, config.head_dim
        # (3C, ...) rows as (nh, 3, hs) -> (3, nh, hs): q of every head, then k, then v
        return t.reshape(nh, 3, hs, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
