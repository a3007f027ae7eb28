"""Qwen2: Llama's block with biases on q, k and v (not o), and an optional window on late layers.

As Qwen2Config does it: `use_sliding_window` false means no window at all; otherwise the layers
that `layer_types` marks "sliding_attention" (by default those from `max_window_layers` on) use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from gptdeploy.errors import SourceError
from gptdeploy.exporters.sources.families.llama import Llama

LAYER_TYPES = ("full_attention", "sliding_attention")


class Qwen2(Llama):
    name = "qwen2"
    model_types = ("qwen2",)
    defaults: ClassVar[dict] = {  # Qwen2Config's
        **Llama.defaults, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
        "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": 28,
    }

    def block(self, hf, get, where) -> dict:
        self.require_silu(get, where)
        return {"qkv_bias": True, "attn_proj_bias": False, "mlp_bias": False}  # Qwen2Attention's

    def window(self, hf, get, where: Path):
        size = get("sliding_window") if get("use_sliding_window") else None
        n_layer, first = get("num_hidden_layers"), get("max_window_layers")
        types = hf.get("layer_types")
        if types is None and isinstance(n_layer, int) and isinstance(first, int):
            types = ["sliding_attention" if size is not None and i >= first else "full_attention" for i in range(n_layer)]
        if not (isinstance(types, list) and len(types) == n_layer and set(types) <= set(LAYER_TYPES)):
            raise SourceError(
                f"{where}: layer_types must list {', '.join(LAYER_TYPES)} once per layer ({n_layer}), got {types!r}"
            )
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        return (size, layers) if size is not None and layers else (None, None)
