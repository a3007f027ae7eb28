"""The canonical decoder: one export-friendly PyTorch module for the GPT-2 family.

Explicit KV-cache tensors in and out, `position_ids` and `attention_mask` inputs (left
padding works), optional per-layer attention probabilities. HF GPT-2 and nanoGPT differ
only in config fields (GELU kind, biases, LayerNorm epsilon, attention scaling), never in
classes. Shapes: B batch, T new positions, P past positions, S = P + T, nh heads,
nkv kv heads, hs head size, C embedding, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptdeploy.config import GPTConfig

KV = tuple[torch.Tensor, torch.Tensor]


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, with no Cast node when it already is (the tracer records no-op casts too)."""
    return x if x.dtype == dtype else x.to(dtype)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own cannot drop only the bias before 2.1)."""

    def __init__(self, n: int, bias: bool, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in the dtype of its parameters, which `to_fp16` keeps in fp32: the variance of
        # fp16 GPT-2 activations overflows fp16 (a sum of squares past 65504). Returns x's dtype.
        y = F.layer_norm(_as(x, self.weight.dtype), self.weight.shape, self.weight, self.bias, self.eps)
        return _as(y, x.dtype)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.n_kv, self.hs = config.n_head, config.kv_heads, config.head_dim
        kv_width = 2 * self.n_kv * self.hs
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + kv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        scale = 1.0 / math.sqrt(self.hs)
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1  # HF GPT-2's option, used by some fine-tunes for fp16 stability
        self.scale = scale

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, past: KV
    ) -> tuple[torch.Tensor, KV, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split([C, self.n_kv * self.hs, self.n_kv * self.hs], dim=2)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        k = torch.cat([past[0], k], dim=2)  # (B, nkv, S, hs)
        v = torch.cat([past[1], v], dim=2)  # (B, nkv, S, hs)
        kr, vr = k, v
        if self.n_kv != self.n_head:
            kr = k.repeat_interleave(self.n_head // self.n_kv, dim=1)  # (B, nh, S, hs)
            vr = v.repeat_interleave(self.n_head // self.n_kv, dim=1)  # (B, nh, S, hs)
        # The product runs in the model dtype; scale, mask and softmax always in fp32 (exp
        # overflows fp16, and an fp16 scale would round the scores a second time).
        att = _as(q @ kr.transpose(-2, -1), torch.float32) * self.scale  # (B, nh, T, S) fp32
        # The mask as an additive bias (0 or finfo.min, see GPT.forward): the same scores as
        # masked_fill, since finfo.min + s rounds to finfo.min for any |s| < 2^103, and a
        # broadcast Add over the heads costs a fifth of a broadcast Where (5.5 -> ~1 ms a layer
        # at prompt 512 in onnxruntime, measured on GPT-2-124M).
        att = att + bias  # (B, nh, T, S)
        probs = F.softmax(att, dim=-1)  # (B, nh, T, S) fp32
        y = _as(probs, vr.dtype) @ vr  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y), (k, v), probs


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner, bias=config.bias)
        self.c_proj = nn.Linear(config.inner, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.gelu == "tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.approximate == "none":
            return self.c_proj(F.gelu(h))
        # gelu_new, spelled as onnxruntime's FastGelu fusion expects it: (0.5 * x) * (1 + tanh(...)).
        # torch's own decomposition ends in `* 0.5`, which onnxruntime folds into the next MatMul
        # first, and the GELU then runs as eight separate ops. Same value: * 0.5 is exact.
        inner = math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))
        return self.c_proj((0.5 * h) * (1.0 + torch.tanh(inner)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.attn = Attention(config, layer)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, past: KV):
        a, present, probs = self.attn(self.ln_1(x), bias, past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present, probs


class GPT(nn.Module):
    """GPT-2-family decoder with explicit KV cache; lm_head is tied to the token embedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)

    def empty_past(self, batch: int, dtype: torch.dtype = torch.float32) -> list[KV]:
        c = self.config
        shape = (batch, c.kv_heads, 0, c.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(c.n_layer)]

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int64
        attention_mask: torch.Tensor,  # (B, S) int64, 1 = real token, 0 = padding
        position_ids: torch.Tensor,  # (B, T) int64
        past: list[KV],  # per layer (B, nkv, P, hs) twice
        last_logits_only: bool = False,
    ) -> tuple[torch.Tensor, list[KV], list[torch.Tensor]]:
        T = input_ids.shape[1]
        P = past[0][0].shape[2]
        S = attention_mask.shape[1]  # = P + T
        key_pos = torch.arange(S, device=input_ids.device)  # (S,)
        query_pos = torch.arange(T, device=input_ids.device) + P  # (T,)
        causal = key_pos[None, :] <= query_pos[:, None]  # (T, S)
        allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)  # (B, 1, T, S)
        # finfo.min, not -inf: a fully masked row (a left-pad query) becomes uniform, not NaN.
        zero = torch.zeros((), dtype=torch.float32)
        bias = torch.where(allowed, zero, torch.finfo(torch.float32).min)  # (B, 1, T, S), once for all layers

        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, T, C)
        presents, attentions = [], []
        for block, layer_past in zip(self.h, past):
            x, present, probs = block(x, bias, layer_past)
            presents.append(present)
            attentions.append(probs)
        if last_logits_only:
            x = x[:, -1:, :]  # (B, 1, C): prefill needs only the next token's logits
        # The logits are computed in fp32 whatever the model dtype: an fp16 logit of magnitude
        # ~30 is off by up to 0.008, which reorders near-tied tokens.
        x = self.ln_f(_as(x, torch.float32))  # (B, T or 1, C) fp32
        B, Tl, C = x.shape
        # 2-D linear exports as Gemm(transB=1) reading wte itself, so the tied matrix is
        # stored once and never transposed into a second copy (Optimum's graph holds two);
        # in an fp16 model it is read through a Cast (see exporters/onnx.py `_tie_lm_head`).
        logits = F.linear(x.reshape(B * Tl, C), _as(self.wte.weight, torch.float32))  # (B*Tl, V)
        logits = logits.view(B, Tl, -1)  # (B, T or 1, V) fp32
        return logits, presents, attentions


def to_fp16(model: GPT) -> GPT:
    """The fp16 variant, in place: fp16 weights and KV cache; LayerNorm parameters (and so
    LayerNorm, see above) stay fp32, as do softmax and the logits by construction."""
    keep = {id(p) for m in model.modules() if isinstance(m, LayerNorm) for p in m.parameters()}
    for p in model.parameters():  # not model.half(): LayerNorm parameters must not round through fp16
        if id(p) not in keep:
            p.data = p.data.half()
    return model


def load_state(model: GPT, state: dict[str, torch.Tensor]) -> None:
    """Load a canonical state dict, strictly; shape mismatches name the tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        from gptdeploy.errors import SourceError

        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        if wrong:
            parts.append(f"shape mismatch {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
        raise SourceError("checkpoint weights do not match its config: " + "; ".join(parts))
    # assign: the parameters become the given tensors (no copy), so a model built on the meta
    # device costs no memory of its own (GPT-2-124M export peak: 2.9 -> 2.4 GiB, measured).
    model.load_state_dict(state, strict=True, assign=True)
