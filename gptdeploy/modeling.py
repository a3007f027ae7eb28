"""The canonical decoder: one export-friendly PyTorch module for every supported family.

Explicit KV-cache tensors in and out, `position_ids` and `attention_mask` inputs (left padding
works), optional per-layer attention probabilities. GPT-2, nanoGPT, Llama, Mistral, Qwen2/3 and
GPT-NeoX differ only in GPTConfig's switches (norm, positions, MLP, biases, residual form,
window, head), never in classes. Parameter names are GPT-2's and stable (the manifest's weights
map and the loaders use them): wte, wpe, h.{i}.ln_1, h.{i}.attn.c_attn (q|k|v rows),
h.{i}.attn.q_norm/k_norm, h.{i}.attn.c_proj, h.{i}.ln_2, h.{i}.mlp.c_fc (SwiGLU: gate|up rows),
h.{i}.mlp.c_proj, ln_f, lm_head (untied only).
Shapes: B batch, T new positions, P past positions, S = P + T, nh heads, nkv kv heads, hs head
size, rd rotary dims, C embedding, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptdeploy.config import GPTConfig, Rope

KV = tuple[torch.Tensor, torch.Tensor]
Masks = tuple[torch.Tensor, torch.Tensor | None]  # additive biases (B, 1, T, S): full, windowed


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, with no Cast node when it already is (the tracer records no-op casts too)."""
    return x if x.dtype == dtype else x.to(dtype)


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis, computed in the dtype of its parameters, which
    `to_fp16` keeps fp32: the variance of fp16 activations overflows fp16 (a sum of squares past
    65504). Returns x's dtype."""

    def __init__(self, n: int, kind: str, bias: bool, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None
        self.kind, self.eps = kind, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _as(x, self.weight.dtype)
        if self.kind == "layernorm":
            y = F.layer_norm(h, self.weight.shape, self.weight, self.bias, self.eps)
        else:  # HF LlamaRMSNorm op for op: x * rsqrt(mean(x^2) + eps), then * weight
            y = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))
            y = y if self.bias is None else y + self.bias
        return _as(y, x.dtype)


def rope_inv_freq(rope: Rope, head_dim: int) -> torch.Tensor:
    """(rd/2,) fp32 inverse frequencies, computed as transformers' modeling_rope_utils does for
    rope_type default, linear and llama3 (same ops, same order, so the same fp32 values)."""
    rd = rope.dim or head_dim
    # device="cpu": a model built under torch.device("meta") still gets real frequencies.
    steps = torch.arange(0, rd, 2, dtype=torch.int64, device="cpu").float()  # (rd/2,)
    inv = 1.0 / (rope.theta ** (steps / rd))
    if rope.scaling == "linear":
        inv = inv / rope.factor
    elif rope.scaling == "llama3":  # Llama 3.1: long waves slowed by `factor`, short kept, a ramp between
        old, lo, hi = rope.original_max_positions, rope.low_freq_factor, rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        slowed = torch.where(wavelen > old / lo, inv / rope.factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * slowed / rope.factor + smooth * slowed
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        inv = torch.where(medium, smoothed, slowed)
    return inv


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's apply_rotary_pos_emb (rotate_half, the NeoX/Llama layout) on the first rd dims, in
    fp32 whatever the model dtype, so an fp16 graph rounds q and k once. x (B, n, T, hs)."""
    rd = cos.shape[-1]
    h = _as(x, torch.float32)
    rot, keep = h[..., :rd], h[..., rd:]  # (B, n, T, rd), (B, n, T, hs - rd)
    half = torch.cat([-rot[..., rd // 2 :], rot[..., : rd // 2]], dim=-1)  # rotate_half
    y = rot * cos + half * sin  # (B, n, T, rd)
    if keep.shape[-1]:  # partial rotary: the other dims pass through (a Python int when traced)
        y = torch.cat([y, keep], dim=-1)
    return _as(y, x.dtype)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.n_kv, self.hs = config.n_head, config.kv_heads, config.head_dim
        q_width, kv_width = self.n_head * self.hs, self.n_kv * self.hs
        self.c_attn = nn.Linear(config.n_embd, q_width + 2 * kv_width, bias=config.qkv_bias)
        self.c_proj = nn.Linear(q_width, config.n_embd, bias=config.attn_proj_bias)
        if config.qk_norm:
            self.q_norm = Norm(self.hs, "rmsnorm", False, config.layer_norm_eps)
            self.k_norm = Norm(self.hs, "rmsnorm", False, config.layer_norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = config.attention_scale(layer)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, past: KV, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, KV, torch.Tensor]:
        B, T, _ = x.shape
        sizes = [self.n_head * self.hs, self.n_kv * self.hs, self.n_kv * self.hs]
        q, k, v = self.c_attn(x).split(sizes, dim=2)
        q = q.view(B, T, self.n_head, self.hs)  # (B, T, nh, hs)
        k = k.view(B, T, self.n_kv, self.hs)  # (B, T, nkv, hs)
        if self.qk_norm:  # Qwen3: per head, before the rotary
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        k = torch.cat([past[0], k], dim=2)  # (B, nkv, S, hs)
        v = torch.cat([past[1], v], dim=2)  # (B, nkv, S, hs)
        kr, vr = k, v
        if self.n_kv != self.n_head:
            kr = k.repeat_interleave(self.n_head // self.n_kv, dim=1)  # (B, nh, S, hs)
            vr = v.repeat_interleave(self.n_head // self.n_kv, dim=1)  # (B, nh, S, hs)
        # The product runs in the model dtype; scale, mask and softmax always in fp32 (exp
        # overflows fp16, and an fp16 scale would round the scores a second time).
        att = _as(q @ kr.transpose(-2, -1), torch.float32) * self.scale  # (B, nh, T, S) fp32
        # The mask as an additive bias (0 or finfo.min, see GPT.masks): the same scores as
        # masked_fill, since finfo.min + s rounds to finfo.min for any |s| < 2^103, and a
        # broadcast Add over the heads costs a fifth of a broadcast Where (5.5 -> ~1 ms a layer
        # at prompt 512 in onnxruntime, measured on GPT-2-124M).
        att = att + bias  # (B, nh, T, S)
        probs = F.softmax(att, dim=-1)  # (B, nh, T, S) fp32
        y = _as(probs, vr.dtype) @ vr  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hs)  # (B, T, nh*hs)
        return self.c_proj(y), (k, v), probs


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        width = 2 * config.inner if config.mlp == "swiglu" else config.inner  # gate|up: one GEMM
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.mlp_bias)
        self.c_proj = nn.Linear(config.inner, config.n_embd, bias=config.mlp_bias)
        self.kind, self.inner = config.mlp, config.inner
        self.approximate = "tanh" if config.gelu == "tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, inner) or (B, T, 2 * inner)
        if self.kind == "swiglu":
            gate, up = h.split(self.inner, dim=-1)  # (B, T, inner) each
            return self.c_proj(F.silu(gate) * up)
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
        args = (config.n_embd, config.norm, config.norm_bias, config.layer_norm_eps)
        self.ln_1 = Norm(*args)
        self.attn = Attention(config, layer)
        self.ln_2 = Norm(*args)
        self.mlp = MLP(config)
        self.parallel = config.parallel_residual
        self.windowed = config.windowed(layer)

    def forward(self, x: torch.Tensor, masks: Masks, past: KV, rope):
        bias = masks[1] if self.windowed else masks[0]
        a, present, probs = self.attn(self.ln_1(x), bias, past, rope)
        if self.parallel:  # GPT-NeoX: both branches read x; summed in HF's order
            return self.mlp(self.ln_2(x)) + a + x, present, probs
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present, probs


class GPT(nn.Module):
    """Decoder-only transformer with explicit KV cache; the switches are GPTConfig's."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.rope is None:
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:  # not a parameter: a constant of the graph, and never in a state dict
            self.register_buffer("inv_freq", rope_inv_freq(config.rope, config.head_dim), persistent=False)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = Norm(config.n_embd, config.norm, config.norm_bias, config.layer_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def empty_past(self, batch: int, dtype: torch.dtype = torch.float32) -> list[KV]:
        c = self.config
        shape = (batch, c.kv_heads, 0, c.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(c.n_layer)]

    def masks(self, attention_mask: torch.Tensor, T: int, P: int) -> Masks:
        """Additive biases (B, 1, T, S), computed once for all layers: 0 where a query may attend,
        finfo.min elsewhere (not -inf: a fully masked row, a left-pad query, becomes uniform, not NaN)."""
        S = attention_mask.shape[1]  # = P + T
        key_idx = torch.arange(S, device=attention_mask.device)  # (S,)
        query_idx = torch.arange(T, device=attention_mask.device) + P  # (T,)
        causal = key_idx[None, :] <= query_idx[:, None]  # (T, S)
        allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)  # (B, 1, T, S)
        zero, low = torch.zeros((), dtype=torch.float32), torch.finfo(torch.float32).min
        windowed = None
        if self.config.sliding_window is not None:
            # The window counts token positions of each row, not cache slots, so a left-padded
            # row sees what it would alone. CumSum in fp32 (exact to 2^24): TensorRT has no int64 CumSum.
            key_pos = attention_mask.to(torch.float32).cumsum(-1) - 1  # (B, S)
            query_pos = key_pos[:, P:]  # (B, T)
            near = key_pos[:, None, :] > query_pos[:, :, None] - self.config.sliding_window  # (B, T, S)
            windowed = torch.where(allowed & near[:, None], zero, low)  # (B, 1, T, S)
        return torch.where(allowed, zero, low), windowed

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int64
        attention_mask: torch.Tensor,  # (B, S) int64, 1 = real token, 0 = padding
        position_ids: torch.Tensor,  # (B, T) int64
        past: list[KV],  # per layer (B, nkv, P, hs) twice
        last_logits_only: bool = False,
    ) -> tuple[torch.Tensor, list[KV], list[torch.Tensor]]:
        T, P = input_ids.shape[1], past[0][0].shape[2]
        masks = self.masks(attention_mask, T, P)
        x = self.wte(input_ids)  # (B, T, C)
        rope = None
        if self.config.rope is None:
            x = x + self.wpe(position_ids)  # (B, T, C)
        else:  # cos/sin once for all layers, in fp32, from each row's own positions
            freqs = position_ids[..., None].to(torch.float32) * self.inv_freq  # (B, T, rd/2)
            emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, rd)
            rope = (emb.cos(), emb.sin())
        presents, attentions = [], []
        for block, layer_past in zip(self.h, past):
            x, present, probs = block(x, masks, layer_past, rope)
            presents.append(present)
            attentions.append(probs)
        if last_logits_only:
            x = x[:, -1:, :]  # (B, 1, C): prefill needs only the next token's logits
        # The logits are computed in fp32 whatever the model dtype: an fp16 logit of magnitude
        # ~30 is off by up to 0.008, which reorders near-tied tokens.
        x = self.ln_f(_as(x, torch.float32))  # (B, T or 1, C) fp32
        B, Tl, C = x.shape
        # 2-D linear on the (V, C) matrix: exports as Gemm(transB=1) on the one stored matrix (the
        # tied wte, or lm_head), never a transposed copy (see exporters/onnx.py `_lm_head_gemm`).
        head = self.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(x.reshape(B * Tl, C), _as(head, torch.float32))  # (B*Tl, V)
        logits = logits.view(B, Tl, -1)  # (B, T or 1, V) fp32
        return logits, presents, attentions


def to_fp16(model: GPT) -> GPT:
    """The fp16 variant, in place: fp16 weights and KV cache; norm parameters (and so every
    norm, see Norm) stay fp32, as do rotary, softmax and the logits by construction."""
    keep = {id(p) for m in model.modules() if isinstance(m, Norm) for p in m.parameters()}
    for p in model.parameters():  # not model.half(): norm parameters must not round through fp16
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
