"""GPT-2 (HF GPT2LMHeadModel): LayerNorm, GELU MLP, learned positions, biases everywhere, and
Conv1D weights stored (in, out), transposed here to nn.Linear's (out, in). The canonical names are
GPT-2's own, so the mapping is the identity under `transformer.`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

from gptdeploy.config import GPTConfig
from gptdeploy.errors import ConfigError, SourceError
from gptdeploy.exporters.sources.families.base import GELU, Family

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    defaults: ClassVar[dict] = {  # GPT2Config's
        "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
    }
    norm, mlp = "layernorm", "gelu"
    prefix = "transformer."  # old .bin saves have none
    top: ClassVar[dict[str, str]] = {"wte": "wte", "wpe": "wpe", "ln_f": "ln_f", "lm_head": "lm_head"}
    layer = "h.{i}."
    blocks: ClassVar[dict] = {k: k for k in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")}
    ignored = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers of older saves

    def config(self, hf: dict, where: Path) -> GPTConfig:
        if hf.get("scale_attn_weights", True) is False:
            raise SourceError(f"{where}: scale_attn_weights=false (unscaled attention scores) is not supported")
        if hf.get("add_cross_attention", False):
            raise SourceError(
                f"{where}: add_cross_attention=true (an encoder-decoder GPT-2) is not supported; "
                "gptdeploy exports decoder-only models"
            )
        get = self._getter(hf)
        act = get("activation_function")
        if act not in GELU:
            raise SourceError(f"{where}: activation_function {act!r} is not supported; supported: {', '.join(GELU)}")
        eps = get("layer_norm_epsilon")
        try:
            return GPTConfig(
                n_layer=get("n_layer"), n_head=get("n_head"), n_embd=get("n_embd"), vocab_size=get("vocab_size"),
                block_size=get("n_positions"), n_inner=get("n_inner"), bias=True,
                layer_norm_eps=float(eps) if isinstance(eps, (int, float)) else eps, gelu=GELU[act],
                scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
                family=self.name, tie_word_embeddings=bool(get("tie_word_embeddings")),
            )
        except ConfigError as exc:
            raise SourceError(f"{where}: {exc}") from None

    def convert(self, name, t, config):
        return t.t() if name.endswith(_CONV1D) and t.ndim == 2 else t  # Conv1D (in, out) -> (out, in)
