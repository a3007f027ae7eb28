"""Llama 2/3 (and TinyLlama, SmolLM): the shared mapping of base.Family, with LlamaConfig's defaults.

RMSNorm, SwiGLU, rotary (default, linear or llama3 scaling), grouped-query attention, tied or
untied head; `attention_bias` puts biases on q, k, v and o, `mlp_bias` on the MLP.
"""

from __future__ import annotations

from typing import ClassVar

from gptdeploy.exporters.sources.families.base import Family


class Llama(Family):
    name = "llama"
    model_types = ("llama",)
    defaults: ClassVar[dict] = {  # LlamaConfig's, for keys a config.json leaves out (transformers does the same)
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False,
    }
