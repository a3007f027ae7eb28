"""Fused fast graphs for onnxruntime on the CPU (bundles exported without attention outputs).

Three passes, and the report says what each one actually did:

1. Attention -> `com.microsoft.MultiHeadAttention`, our own pass. onnxruntime's GPT-2 attention
   fusion recognises only Hugging Face's old export, whose cache is one stacked `past_{i}`
   tensor per layer; our graph carries the key and value separately (the contract), so the
   optimizer fuses no attention here (measured: `Attention: 0`). We know our own graph, so
   we rewrite each layer's ~60 shape/split/transpose/concat/mask/softmax nodes as one node:
   ::
       qkv (B, T, C+2kv) ─Split─ q, k, v ─MultiHeadAttention(past_key, past_value,
                                             attention_bias)─ y (B, T, C), present.{i}.key/.value
       allowed (B, 1, T, S) ─Where(0, finfo.min)─ attention_bias   (computed once, shared)
   The additive bias is the mask the unfused graph applies (finfo.min, not -inf): a fully
   masked row stays finite and uniform, exactly as before. The pass reads the model's
   description (`attention_unfusable`): with rotary positions, grouped-query attention, q/k
   norms or a sliding window, something sits between the projection and the op (or the op
   cannot express it), so the layers stay unfused and the report says why.
2. onnxruntime's transformer optimizer for the norm and GELU fusions (SkipLayerNormalization,
   (Skip)SimplifiedLayerNormalization, FastGelu / BiasGelu): exporters/ort_fusions.py.

3. For a graph that ships as fp32 (not one about to be quantized): `gemv.linears_as_gemv`, every
   Linear as Gemm(transB=1) on an unpacked (N, K) weight, which decodes ~14% faster on
   GPT-2-124M for ~5-16% more prefill time (see there).

The result uses onnxruntime contrib ops: it is a CPU/onnxruntime graph, never a TensorRT one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gptdeploy import contract as io
from gptdeploy.config import GPTConfig
from gptdeploy.contract import GraphSignature
from gptdeploy.exporters.graph_edits import (
    MS_DOMAIN,
    ensure_opset,
    insert_after,
    insert_before,
    remove_dead_nodes,
)
from gptdeploy.exporters.ort_fusions import run_ort_optimizer

log = logging.getLogger(__name__)

_BIAS = "attention_bias"  # (B, 1, T, S) fp32 additive mask, shared by every layer


@dataclass
class FusionReport:
    """What each pass fused, op by op, and why anything was left alone."""

    attention: int = 0  # layers rewritten as MultiHeadAttention
    gemv: int = 0  # Linear MatMuls rewritten as Gemm(transB=1) on unpacked weights (fp32 decode layout)
    optimizer: dict[str, int] = field(default_factory=dict)  # ops onnxruntime's optimizer created, by type
    notes: list[str] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0

    def to_dict(self) -> dict:
        return {
            "MultiHeadAttention (gptdeploy pass)": self.attention,
            "Linear as unpacked Gemm(transB=1) (gptdeploy pass)": self.gemv,
            "onnxruntime optimizer": self.optimizer,
            "nodes": f"{self.nodes_before} -> {self.nodes_after}",
            "notes": self.notes,
        }


def fuse_graph(
    proto: onnx.ModelProto, config: GPTConfig, sig: GraphSignature, decode_layout: bool = False
) -> tuple[onnx.ModelProto, FusionReport]:
    """Both passes on a copy of `proto` (an fp32 graph without attention outputs); with
    `decode_layout` (a graph that ships as fp32, not one to quantize), then `linears_as_gemv`."""
    if sig.attentions:
        raise ValueError("fusion removes attention probabilities; fuse only graphs exported without them")
    fused = onnx.ModelProto()
    fused.CopyFrom(proto)
    report = FusionReport(nodes_before=len(fused.graph.node))
    problem = fuse_attention(fused, config, sig)
    if problem:
        report.notes.append(f"attention not fused: {problem}")
    else:
        report.attention = config.n_layer
    report.optimizer = run_ort_optimizer(fused, config, report.notes)
    if decode_layout:
        from gptdeploy.exporters.gemv import linears_as_gemv

        report.gemv = linears_as_gemv(fused, io.INPUT_IDS)
    report.nodes_after = len(fused.graph.node)
    return fused, report


# ------------------------------------------------------------------------------------ attention


def attention_unfusable(config: GPTConfig) -> str | None:
    """Why this model's attention is not ours to fuse, read from its description, or None.

    The pass rewrites everything from the qkv projection to the output projection as one
    MultiHeadAttention: nothing may sit in between that the op does not compute itself."""
    if config.rope is not None:
        return "rotary positions (the rotary sits between the qkv projection and MultiHeadAttention)"
    if config.kv_heads != config.n_head:
        return "grouped-query attention (MultiHeadAttention needs as many key/value heads as query heads)"
    if config.qk_norm:
        return "q/k norms (they sit between the qkv projection and MultiHeadAttention)"
    if config.sliding_window is not None:
        return "sliding-window attention (the pass shares one causal mask between all layers)"
    return None


def fuse_attention(proto: onnx.ModelProto, config: GPTConfig, sig: GraphSignature) -> str | None:
    """Rewrite every layer's attention as MultiHeadAttention, in place. Returns why not, or None.

    Checks every layer first and changes nothing unless all of them match.
    """
    why = attention_unfusable(config)
    if why:
        return why
    g = proto.graph
    by_name = {n.name: n for n in g.node}
    producers = {o: n for n in g.node for o in n.output}
    mask = by_name.get("/m/And")
    if mask is None:
        return "the attention mask node /m/And was not found (exporter changed?)"
    plans = []
    for i in range(config.n_layer):
        plan = _plan_layer(i, g, by_name, producers, sig)
        if isinstance(plan, str):
            return plan
        plans.append(plan)

    C, kv = config.n_embd, config.kv_heads * config.head_dim
    g.initializer.extend([
        numpy_helper.from_array(np.array(0.0, np.float32), f"{_BIAS}.allowed"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), f"{_BIAS}.masked"),
        numpy_helper.from_array(np.array([C, kv, kv], np.int64), "attn.qkv_split"),
    ])
    where = helper.make_node("Where", [mask.output[0], f"{_BIAS}.allowed", f"{_BIAS}.masked"], [_BIAS], name="/m/attention_bias")
    insert_after(g, mask, [where])
    for i, (qkv, c_proj, scale) in enumerate(plans):
        p = f"/m/h.{i}/attn"
        q, k, v = (f"{p}/{s}" for s in ("q", "k", "v"))
        split = helper.make_node("Split", [qkv, "attn.qkv_split"], [q, k, v], name=f"{p}/Split", axis=2)
        mha = helper.make_node(
            "MultiHeadAttention",
            [q, k, v, "", "", _BIAS, sig.past_names()[2 * i], sig.past_names()[2 * i + 1]],
            [f"{p}/MultiHeadAttention_output_0", sig.present_names()[2 * i], sig.present_names()[2 * i + 1]],
            name=f"{p}/MultiHeadAttention", domain=MS_DOMAIN, num_heads=config.n_head, scale=scale,
        )
        for node in g.node:  # the old producers of the presents give their names up
            for j, out in enumerate(node.output):
                if out in (mha.output[1], mha.output[2]):
                    node.output[j] = f"{out}/unfused"
        c_proj.input[0] = mha.output[0]
        insert_before(g, c_proj, [split, mha])
    ensure_opset(proto, MS_DOMAIN)
    remove_dead_nodes(g)
    return None


def _plan_layer(i, g, by_name, producers, sig) -> tuple[str, onnx.NodeProto, float] | str:
    """(qkv tensor, c_proj MatMul, scale) of layer i, or what is missing."""
    p = f"/m/h.{i}/attn"
    c_attn, c_proj = by_name.get(f"{p}/c_attn/MatMul"), by_name.get(f"{p}/c_proj/MatMul")
    if c_attn is None or c_proj is None:
        return f"layer {i}: c_attn / c_proj MatMul not found"
    qkv = c_attn.output[0]
    bias_add = by_name.get(f"{p}/c_attn/Add")
    if bias_add is not None and qkv in bias_add.input:
        qkv = bias_add.output[0]
    scales = [s for n in g.node if n.name.startswith(f"{p}/Mul") and (s := _scalar_input(n, producers, g)) is not None]
    if len(scales) != 1:
        return f"layer {i}: expected one scale Mul in the attention, found {len(scales)}"
    present = producers.get(sig.present_names()[2 * i])
    if present is None or present.op_type != "Concat":
        return f"layer {i}: present key is not produced by a Concat"
    return qkv, c_proj, scales[0]


def _scalar_input(node: onnx.NodeProto, producers, g) -> float | None:
    if node.op_type != "Mul":
        return None
    inits = {t.name: t for t in g.initializer}
    for name in node.input:
        t = inits.get(name)
        src = producers.get(name)
        if t is None and src is not None and src.op_type == "Constant":
            t = src.attribute[0].t
        if t is not None and int(np.prod(t.dims)) == 1:
            return float(numpy_helper.to_array(t).reshape(()))
    return None


__all__ = ["FusionReport", "attention_unfusable", "fuse_attention", "fuse_graph", "insert_before", "remove_dead_nodes"]
