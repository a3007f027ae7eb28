"""onnxruntime's transformer optimizer on our graphs: the norm and GELU fusions.

RMSNorm -> (Skip)SimplifiedLayerNormalization, GELU -> FastGelu / BiasGelu. A LayerNorm stays
Add + LayerNormalization: onnxruntime's CPU SkipLayerNormalization (the fusion of the two)
normalizes element by element with a division each, where LayerNormalization runs MLAS's
vectorized kernel. 24 of them at (1, 512, 768) took 22.9 ms against 4.9 ms as Add +
LayerNormalization, 0.11 against 0.04 ms at one position (onnxruntime 1.32, 2 threads); the
GPT-2-124M int8 TTFT at 512 went from 125.8 to 99.6 ms (one `gptdeploy bench` run with both
exports; docs/performance.md). SkipSimplifiedLayerNormalization took 4.0 ms for the same 24, so
RMSNorm families keep it. onnxruntime does not fuse Add + LayerNormalization again on the CPU
when it loads the graph (tests/test_precision.py). model_type gpt2: its pass list is the generic
one plus GPT-2's attention
(which finds nothing in our graphs, see fusion.py); gpt_neox and qwen3 fused exactly the same ops
on our Llama, Qwen3 and GPT-NeoX graphs (measured). Two repairs around it:

- Its GPT-2 post-pass rewrites every Gemm fed by a Reshape of a LayerNorm as MatMul + Add of
  `input[2]`, which ignores transB and crashes on a Gemm without bias: right for the old HF
  export, wrong for our lm_head. So during the pass the lm_head reads `Transpose(head)` through a
  MatMul, and is turned back into Gemm(transB=1) on the one stored matrix afterwards.
- An RMSNorm it cannot merge with a residual Add stays SimplifiedLayerNormalization, an op
  onnxruntime registers in the ONNX domain, which onnx's checker rejects: back to standard ops.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gptdeploy.config import GPTConfig
from gptdeploy.exporters.graph_edits import MS_DOMAIN, ensure_opset, insert_before


def run_ort_optimizer(proto: onnx.ModelProto, config: GPTConfig, notes: list[str]) -> dict[str, int]:
    """onnxruntime's optimizer on `proto`, in place; returns the ops it created, by type, and adds
    to `notes` what it did not fuse that this model has."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    before = {n.op_type for n in proto.graph.node}
    restore = _hide_lm_head_gemm(proto)
    quiet = [logging.getLogger(n) for n in ("onnx_model", "fusion_base", "fusion_utils", "onnx_model_bert",
                                             "fusion_skiplayernorm", "onnx_model_gpt2", "optimizer")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)  # the optimizer logs warnings about passes that do not apply to us
    options = FusionOptions("gpt2")
    # One switch covers both Skip*Normalization fusions: off where it would make SkipLayerNormalization
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = config.norm != "layernorm"
    try:
        optimized = optimize_model(
            proto, model_type="gpt2", num_heads=config.n_head, hidden_size=config.n_embd, opt_level=0,
            optimization_options=options,
        )
        # Its statistics count ops present afterwards; keep those it created (not ours, not LayerNorm).
        stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v and k not in before}
        new = optimized.model
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    restore(new)
    lone = _unfuse_lone_rms_norms(new)
    if lone:
        stats["SimplifiedLayerNormalization"] -= lone
        stats = {k: v for k, v in stats.items() if v}
        notes.append(f"{lone} RMSNorm without a residual Add left as standard ops (onnxruntime fuses them on load)")
    if any(n.domain == MS_DOMAIN for n in new.graph.node):
        ensure_opset(new, MS_DOMAIN)  # the optimizer's Skip*Normalization ops do not add it themselves
    proto.CopyFrom(new)
    if config.mlp == "gelu" and not any(k in stats for k in ("FastGelu", "Gelu", "BiasGelu")):
        notes.append("onnxruntime fused no GELU")
    if config.norm != "layernorm" and "SkipSimplifiedLayerNormalization" not in stats:
        notes.append("onnxruntime fused no residual Add into SkipSimplifiedLayerNormalization")
    return stats


def _hide_lm_head_gemm(proto: onnx.ModelProto):
    """Replace the lm_head Gemm(transB=1) by MatMul(x, Transpose(head)); returns the inverse."""
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
        tr = next((n for n in graph.node if n.output[0] == mm.input[1]), None)
        if tr is not None:
            graph.node.remove(tr)
            head = tr.input[0]
        else:  # the optimizer folded Transpose(head) into the initializer itself (an untied head,
            # read by nothing else): transpose it back, in place, to the one stored (V, C) matrix
            t = next(t for t in graph.initializer if t.name == mm.input[1])
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(t).T), t.name))
            head = t.name
        back = helper.make_node("Gemm", [mm.input[0], head], list(mm.output), name=gemm.name, transB=1)
        insert_before(graph, mm, [back])
        graph.node.remove(mm)

    return restore


def _unfuse_lone_rms_norms(proto: onnx.ModelProto) -> int:
    """SimplifiedLayerNormalization (an RMSNorm the optimizer could not merge with a residual Add
    into com.microsoft's SkipSimplifiedLayerNormalization: the first one) back to standard ops.
    onnxruntime registers it in the ONNX domain, where onnx's checker (save_graph) rejects it, and
    fuses the standard ops again itself when it loads the graph (a built-in level-1 transformer).
    ::
        x ─SimplifiedLayerNormalization(w)─ y   =>   x / Sqrt(ReduceMean(x^2) + eps) * w
    """
    g, count = proto.graph, 0
    for node in [n for n in g.node if n.op_type == "SimplifiedLayerNormalization" and n.domain in ("", "ai.onnx")]:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("axis", -1) != -1 or any(node.output[1:]):
            raise RuntimeError(f"{node.name}: unexpected SimplifiedLayerNormalization form; optimizer changed?")
        p, (x, w) = node.name or node.output[0], node.input[:2]
        eps = f"{p}/epsilon"
        g.initializer.append(numpy_helper.from_array(np.array(attrs.get("epsilon", 1e-5), np.float32), eps))
        g.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), f"{p}/two"))
        t = [f"{p}/{s}" for s in ("sq", "mean", "var_eps", "std", "normed")]
        insert_before(g, node, [
            helper.make_node("Pow", [x, f"{p}/two"], [t[0]], name=f"{p}/Pow"),
            helper.make_node("ReduceMean", [t[0]], [t[1]], name=f"{p}/ReduceMean", axes=[-1], keepdims=1),
            helper.make_node("Add", [t[1], eps], [t[2]], name=f"{p}/Add"),
            helper.make_node("Sqrt", [t[2]], [t[3]], name=f"{p}/Sqrt"),
            helper.make_node("Div", [x, t[3]], [t[4]], name=f"{p}/Div"),
            helper.make_node("Mul", [t[4], w], [node.output[0]], name=f"{p}/Mul"),
        ])
        g.node.remove(node)
        count += 1
    return count


__all__ = ["run_ort_optimizer"]
