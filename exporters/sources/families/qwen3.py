"""Qwen3: Qwen2's window, an RMSNorm on each head's q and k, a head_dim of its own (128 by default,
independent of hidden_size / heads), and `attention_bias` on q, k, v and o."""

from __future__ import annotations

from typing import ClassVar

from gptdeploy.exporters.sources.families.qwen2 import Qwen2


class Qwen3(Qwen2):
    name = "qwen3"
    model_types = ("qwen3",)
    defaults: ClassVar[dict] = {**Qwen2.defaults, "head_dim": 128, "attention_bias": False}  # Qwen3Config's
    qk_norm = True

    def block(self, hf, get, where) -> dict:
        self.require_silu(get, where)
        attn = bool(get("attention_bias"))
        return {"qkv_bias": attn, "attn_proj_bias": attn, "mlp_bias": False}
