"""The source frameworks' own forwards, which parity compares every export against.

HFReference runs transformers' own model class for the directory (AutoModelForCausalLM: GPT-2,
Llama, Mistral, Qwen2/3, GPT-NeoX). NanoGPTReference re-implements nanoGPT's model.py forward
on nanoGPT's state-dict names; it deliberately does not import gptdeploy.modeling, because it
is the independent check of that module.
Shapes: B batch, S sequence, C embedding, nh heads, nkv kv heads, hs head size, V vocab.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from gptdeploy.errors import SourceError
from gptdeploy.exporters.sources.base import ReferenceOutput


class HFReference:
    """transformers' own model, float32 (bf16/fp16 checkpoints upcast), eager attention (the only
    kind that returns probabilities: per query head, GQA expanded; keys/values per kv head).

    per_row: run each row alone, without its padding. For sliding-window models: transformers
    builds the window on cache slots, where left padding counts; gptdeploy counts each row's own
    token positions, which is what the row means, and what it computes alone.
    """

    def __init__(self, path: Path, per_row: bool = False):
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
        # `dtype=` since 4.56; older releases (4.45+) only know `torch_dtype=`.
        dtype = {"dtype": torch.float32} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float32}

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a library call should not draw on the user's terminal
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), attn_implementation="eager", local_files_only=True, **dtype
            )
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise SourceError(
                f"transformers cannot load {path}: {' '.join(str(exc).split())[:300]}"
            ) from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.model = model.eval()
        self.per_row = per_row
        # A cache without the config: transformers' default one keeps only the last window - 1
        # keys of a sliding layer, and parity compares every key. `cache` since 5.x, before `past_key_values`.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        rows = ", each row alone" if per_row else ""
        self.name = f"transformers {transformers.__version__} {type(model).__name__} (eager attention{rows})"

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> ReferenceOutput:
        if not self.per_row:
            return self._forward(input_ids, attention_mask, position_ids)
        return _row_by_row(self._forward, input_ids, attention_mask, position_ids)

    def _forward(self, input_ids, attention_mask, position_ids) -> ReferenceOutput:
        from transformers import DynamicCache

        out = self.model(
            input_ids=input_ids,  # (B, S)
            attention_mask=attention_mask,  # (B, S)
            position_ids=position_ids,  # (B, S)
            output_attentions=True,
            use_cache=True,
            return_dict=True,
            **{self._cache_arg: DynamicCache()},
        )
        keys, values = _cache_tensors(out)  # per layer (B, nkv, S, hs)
        attentions = [a.float() for a in out.attentions]  # per layer (B, nh, S, S)
        return ReferenceOutput(out.logits.float(), keys, values, attentions)  # logits (B, S, V)


def _row_by_row(forward, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> ReferenceOutput:
    """`forward` on each left-padded row's real tokens alone, placed back at their columns; pad
    positions hold zeros (parity compares real positions only, and a real query's probability of
    a pad key is exactly 0 on both sides)."""
    B, S = ids.shape
    out = None
    for b in range(B):
        start = S - int(mask[b].sum())
        if not bool(mask[b, start:].all()):
            raise ValueError("the per-row reference needs left padding (every row's real tokens last)")
        r = forward(ids[b : b + 1, start:], mask[b : b + 1, start:], pos[b : b + 1, start:])
        if out is None:
            out = ReferenceOutput(
                torch.zeros(B, S, r.logits.shape[-1]),  # (B, S, V)
                [torch.zeros(B, k.shape[1], S, k.shape[-1]) for k in r.keys],  # (B, nkv, S, hs)
                [torch.zeros(B, v.shape[1], S, v.shape[-1]) for v in r.values],
                [torch.zeros(B, a.shape[1], S, S) for a in r.attentions],  # (B, nh, S, S)
            )
        out.logits[b, start:] = r.logits[0]
        for full, t in zip(out.keys + out.values, r.keys + r.values):
            full[b, :, start:] = t[0]  # (nkv, n, hs)
        for full, t in zip(out.attentions, r.attentions):
            full[b, :, start:, start:] = t[0]  # (nh, n, n)
    return out


def _cache_tensors(out) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    # transformers 5.2x returns `cache` (past_key_values before); layers[i].keys since 4.56,
    # key_cache/value_cache lists in 4.45-4.55, tuples of (k, v) in older legacy outputs.
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache wraps the one we want
    if hasattr(cache, "layers"):
        return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(cache.key_cache), list(cache.value_cache)
    return [kv[0] for kv in cache], [kv[1] for kv in cache]


class NanoGPTReference:
    """nanoGPT model.py's forward, written from its math, on its own parameter names.

    Two additions nanoGPT lacks, done the standard (HF) way so padded batches can be checked:
    the position embedding is gathered at `position_ids` instead of arange(S), and padded keys
    are masked like future ones. Masked scores take finfo.min rather than nanoGPT's -inf: every
    row with one allowed key gets identical probabilities (exp(min - max) is exactly 0), and a
    row with none (a left-pad query) becomes uniform instead of NaN, as in HF and gptdeploy.
    Attention is the manual path of model.py (not scaled_dot_product_attention), so the
    probabilities exist to be returned.
    """

    def __init__(self, state: dict[str, torch.Tensor], n_head: int):
        self.sd = {
            k: v.float() for k, v in state.items()
        }  # transformer.wte.weight, transformer.h.0..., lm_head.weight
        self.n_head = n_head
        self.n_layer = sum(
            1 for k in self.sd if k.startswith("transformer.h.") and k.endswith(".ln_1.weight")
        )
        self.name = "nanoGPT model.py forward (independent re-implementation, manual attention)"

    def _ln(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w = self.sd[prefix + ".weight"]
        return F.layer_norm(x, w.shape, w, self.sd.get(prefix + ".bias"), 1e-5)  # nanoGPT's fixed eps

    def _linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.linear(x, self.sd[prefix + ".weight"], self.sd.get(prefix + ".bias"))  # bias=False: none

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> ReferenceOutput:
        sd = self.sd
        B, S = input_ids.shape
        tok_emb = F.embedding(input_ids, sd["transformer.wte.weight"])  # (B, S, C)
        pos_emb = F.embedding(position_ids, sd["transformer.wpe.weight"])  # (B, S, C)
        x = tok_emb + pos_emb  # (B, S, C); dropout is identity in eval
        C = x.shape[-1]
        nh, hs = self.n_head, C // self.n_head
        causal = torch.tril(torch.ones(S, S, dtype=torch.bool))  # (S, S), model.py's `bias` buffer
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, S, S)
        keys, values, attentions = [], [], []
        for i in range(self.n_layer):
            p = f"transformer.h.{i}"
            q, k, v = self._linear(self._ln(x, p + ".ln_1"), p + ".attn.c_attn").split(C, dim=2)
            q = q.view(B, S, nh, hs).transpose(1, 2)  # (B, nh, S, hs)
            k = k.view(B, S, nh, hs).transpose(1, 2)  # (B, nh, S, hs)
            v = v.view(B, S, nh, hs).transpose(1, 2)  # (B, nh, S, hs)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, S, S)
            att = att.masked_fill(~allowed, torch.finfo(att.dtype).min)  # (B, nh, S, S)
            att = F.softmax(att, dim=-1)  # (B, nh, S, S)
            y = att @ v  # (B, nh, S, hs)
            y = y.transpose(1, 2).contiguous().view(B, S, C)  # (B, S, C)
            x = x + self._linear(y, p + ".attn.c_proj")  # (B, S, C)
            h = F.gelu(self._linear(self._ln(x, p + ".ln_2"), p + ".mlp.c_fc"))  # (B, S, 4C), exact GELU
            x = x + self._linear(h, p + ".mlp.c_proj")  # (B, S, C)
            keys.append(k)
            values.append(v)
            attentions.append(att)
        x = self._ln(x, "transformer.ln_f")  # (B, S, C)
        lm_head = sd.get("lm_head.weight", sd["transformer.wte.weight"])  # tied in nanoGPT
        logits = F.linear(x, lm_head)  # (B, S, V): every position, as model.py does with targets
        return ReferenceOutput(logits, keys, values, attentions)
