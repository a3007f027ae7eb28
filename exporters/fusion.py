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
   masked row stays finite and uniform, exactly as before.
2. onnxruntime's transformer optimizer (`optimize_model`, model_type gpt2) for the GELU and
   LayerNorm fusions (FastGelu with its bias, SkipLayerNormalization). Its GPT-2 post-pass
   rewrites every Gemm fed by a Reshape of a LayerNorm as MatMul + Add of `input[2]`, which
   ignores transB and crashes on a Gemm without bias: right for the old HF export, wrong for
   our tied lm_head. So during the pass the lm_head reads `Transpose(wte)` through a MatMul,
   and is turned back into Gemm(transB=1) on the one stored matrix afterwards.

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

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
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
    report.optimizer = _run_ort_optimizer(fused, config, report)
    if decode_layout:
        from gptdeploy.exporters.gemv import linears_as_gemv

        report.gemv = linears_as_gemv(fused, io.INPUT_IDS)
    report.nodes_after = len(fused.graph.node)
    return fused, report


# ------------------------------------------------------------------------------------ attention


def fuse_attention(proto: onnx.ModelProto, config: GPTConfig, sig: GraphSignature) -> str | None:
    """Rewrite every layer's attention as MultiHeadAttention, in place. Returns why not, or None.

    Checks every layer first and changes nothing unless all of them match.
    """
    if config.kv_heads != config.n_head:
        return "grouped-query attention (MultiHeadAttention needs as many key/value heads as query heads)"
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
    _insert_after(g, mask, [where])
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
    _ensure_opset(proto, MS_DOMAIN)
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


# ---------------------------------------------------------------------- onnxruntime's optimizer


def _run_ort_optimizer(proto: onnx.ModelProto, config: GPTConfig, report: FusionReport) -> dict[str, int]:
    from onnxruntime.transformers.optimizer import optimize_model

    before = {n.op_type for n in proto.graph.node}
    restore = _hide_tied_gemm(proto)
    quiet = [logging.getLogger(n) for n in ("onnx_model", "fusion_base", "fusion_utils", "onnx_model_bert",
                                             "fusion_skiplayernorm", "onnx_model_gpt2", "optimizer")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)  # the optimizer logs warnings about passes that do not apply to us
    try:
        optimized = optimize_model(
            proto, model_type="gpt2", num_heads=config.n_head, hidden_size=config.n_embd, opt_level=0
        )
        # Its statistics count ops present afterwards; keep those it created (not ours, not LayerNorm).
        stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v and k not in before}
        new = optimized.model
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    restore(new)
    proto.CopyFrom(new)
    if not any(k in stats for k in ("FastGelu", "Gelu", "BiasGelu")):
        report.notes.append("onnxruntime fused no GELU")
    if "SkipLayerNormalization" not in stats:
        report.notes.append("onnxruntime fused no residual Add into SkipLayerNormalization")
    return stats


def _hide_tied_gemm(proto: onnx.ModelProto):
    """Replace the lm_head Gemm(transB=1) by MatMul(x, Transpose(wte)); returns the inverse."""
    g = proto.graph
    gemm = next((n for n in g.node if n.op_type == "Gemm"), None)
    if gemm is None:
        return lambda p: None
    x, wte = gemm.input[0], gemm.input[1]
    wte_t = f"{gemm.name}/wte_T"
    matmul_name = f"{gemm.name}/MatMul"
    transpose = helper.make_node("Transpose", [wte], [wte_t], name=f"{gemm.name}/Transpose", perm=[1, 0])
    matmul = helper.make_node("MatMul", [x, wte_t], list(gemm.output), name=matmul_name)
    insert_before(g, gemm, [transpose, matmul])
    g.node.remove(gemm)

    def restore(p: onnx.ModelProto) -> None:
        graph = p.graph
        mm = next(n for n in graph.node if n.name == matmul_name)
        tr = next(n for n in graph.node if n.output[0] == mm.input[1])
        back = helper.make_node("Gemm", [mm.input[0], tr.input[0]], list(mm.output), name=gemm.name, transB=1)
        insert_before(graph, mm, [back])
        graph.node.remove(mm)
        graph.node.remove(tr)

    return restore


# ---------------------------------------------------------------------------------- graph edits


def insert_before(g: onnx.GraphProto, anchor: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
    i = list(g.node).index(anchor)
    for j, n in enumerate(nodes):
        g.node.insert(i + j, n)


def _insert_after(g: onnx.GraphProto, anchor: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
    i = list(g.node).index(anchor) + 1
    for j, n in enumerate(nodes):
        g.node.insert(i + j, n)


def _ensure_opset(proto: onnx.ModelProto, domain: str) -> None:
    if not any(o.domain == domain for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(domain, 1))


def remove_dead_nodes(g: onnx.GraphProto) -> None:
    """Drop nodes (and initializers) nothing downstream of the graph outputs needs."""
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    unused = [t for t in g.initializer if t.name not in needed]
    for t in unused:
        g.initializer.remove(t)


__all__ = ["FusionReport", "fuse_attention", "fuse_graph", "insert_before", "remove_dead_nodes"]
