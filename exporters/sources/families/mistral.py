"""Mistral: Llama's block with sliding-window attention on every layer, and no biases.

transformers builds Mistral's window on cache slots (left padding counts); the canonical module
counts each row's token positions, which is what the row means alone (gptdeploy/modeling.py).
"""

from __future__ import annotations

from typing import ClassVar

from gptdeploy.exporters.sources.families.llama import Llama


class Mistral(Llama):
    name = "mistral"
    model_types = ("mistral",)
    defaults: ClassVar[dict] = {  # MistralConfig's
        **Llama.defaults, "intermediate_size": 14336, "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32, "sliding_window": 4096,
    }

    def block(self, hf, get, where) -> dict:
        self.require_silu(get, where)
        return {"qkv_bias": False, "attn_proj_bias": False, "mlp_bias": False}  # MistralAttention: bias=False

    def window(self, hf, get, where):
        return get("sliding_window"), None  # null in config.json: no window
