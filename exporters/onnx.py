"""Canonical decoder -> one ONNX graph that serves prefill (empty past) and decode.

We use torch.onnx's TorchScript tracer (`dynamo=False`) on purpose: `torch.export`
(the default since PyTorch 2.9) specializes dynamic dimensions whose example size is 0
or 1, which are exactly the empty-past prefill and the one-token decode, and it cannot
express `total = past + seq` between inputs given as varargs. The tracer keeps every axis
symbolic; we trace with sizes >= 2 and the tests run the graph at 0 and 1. Opset 17 keeps
attention as explicit MatMul + Softmax (no fused Attention op), which is what lets the
graph return attention probabilities and what TensorRT's parser accepts.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from gptdeploy.contract import GraphSignature
from gptdeploy.exporters.graph_files import graph_inputs, save_graph
from gptdeploy.modeling import GPT

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is a standard op from 17; TensorRT 10 parses 17


class _FlatSignature(torch.nn.Module):
    """Adapts GPT.forward to the flat tensor IO of the contract (the tracer needs flat tensors)."""

    def __init__(self, model: GPT, signature: GraphSignature):
        super().__init__()
        self.m = model
        self.sig = signature

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.sig.n_layer)]
        logits, presents, attentions = self.m(
            input_ids, attention_mask, position_ids, past, last_logits_only=self.sig.last_logits_only
        )
        flat = [t for kv in presents for t in kv]
        return (logits, *flat, *(attentions if self.sig.attentions else []))


def signature_for(model: GPT, *, attentions: bool, last_logits_only: bool, kv_dtype: str = "float32"):
    return GraphSignature.for_config(
        model.config, kv_dtype=kv_dtype, attentions=attentions, last_logits_only=last_logits_only
    )


def _example_inputs(model: GPT, sig: GraphSignature) -> tuple[torch.Tensor, ...]:
    # Sizes >= 2 on every dynamic axis, and distinct (B=2, P=3, T=4), so no axis is
    # mistaken for a constant or for another axis.
    B, P, T = 2, 3, 4
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, P + T, dtype=torch.int64)
    pos = torch.arange(P, P + T).expand(B, T).contiguous()
    kv = (B, sig.kv_heads, P, sig.head_dim)
    dtype = getattr(torch, sig.kv_dtype)
    past = [torch.randn(kv, generator=g).to(dtype) for _ in sig.past_names()]
    return (ids, mask, pos, *past)


def _dynamic_axes(sig: GraphSignature) -> dict[str, dict[int, str]]:
    axes = {}
    for spec in [*sig.inputs(), *sig.outputs()]:
        axes[spec.name] = {i: a for i, a in enumerate(spec.axes) if isinstance(a, str)}
    return axes


def export_onnx(
    model: GPT,
    path: Path,
    *,
    attentions: bool = True,
    last_logits_only: bool = False,
    external_data: bool | None = None,
) -> tuple[GraphSignature, str | None]:
    """Trace `model` to `path`. Returns the graph signature and the external-data file name (or None).

    external_data None: when the weights reach EXTERNAL_MIN_BYTES (see save_graph); True forces it.
    """
    model = model.eval()
    kv_dtype = str(model.wte.weight.dtype).removeprefix("torch.")  # "float32", or "float16" after to_fp16
    sig = signature_for(model, attentions=attentions, last_logits_only=last_logits_only, kv_dtype=kv_dtype)
    inputs = [s.name for s in sig.inputs()]
    outputs = [s.name for s in sig.outputs()]
    path = Path(path)
    tmp_path = path.with_name(path.name + ".trace")
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about its own deprecation and about Python ints in traced shapes;
        # neither changes the graph, which the tests run at every axis size that matters.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _FlatSignature(model, sig),
            _example_inputs(model, sig),
            str(tmp_path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=_dynamic_axes(sig),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(tmp_path))
    _cleanup_trace_files(tmp_path, proto)
    tied = model.config.tie_word_embeddings
    head = model.wte.weight if tied else model.lm_head.weight  # (V, C) in the model dtype
    _lm_head_gemm(proto, "wte.weight" if tied else "lm_head.weight", head.detach().cpu().numpy())
    _name_weights(proto)
    return sig, save_graph(proto, path, external_data)


def _cleanup_trace_files(trace_path: Path, proto: onnx.ModelProto) -> None:
    """Remove the tracer's output (and any per-tensor files it wrote for >2 GB models)."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    if any(uses_external_data(t) for t in proto.graph.initializer):
        load_external_data_for_model(proto, str(trace_path.parent))
        for t in proto.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    (trace_path.parent / entry.value).unlink(missing_ok=True)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    trace_path.unlink(missing_ok=True)


def _lm_head_gemm(proto: onnx.ModelProto, name: str, head: np.ndarray) -> None:
    """Store the output projection once, as the (V, C) matrix `head` (model dtype) named `name`.

    The tracer constant-folds `head.T` (fp16: `head.float().T`) into a second initializer for the
    lm_head MatMul (Optimum's GPT-2 export carries both: 652 MB instead of ~500 MB). We point that
    node at the (V, C) matrix as Gemm(transB=1), which onnxruntime and TensorRT run without the
    transpose: the tied `wte` (the Gather's), or an untied `lm_head.weight`, re-made from the folded
    copy when the tracer kept no other. An fp16 matrix is read through a Cast: fp32 logits still.
    ::
        x (B*T, C) ──MatMul── head_T (C, V)   =>   x (B*T, C) ──Gemm(transB=1)── [Cast fp32] ── head (V, C)
    """
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    for i, node in enumerate(g.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        cand = inits[node.input[1]]
        if tuple(cand.dims) != head.T.shape:
            continue
        folded = numpy_helper.to_array(cand)  # (C, V)
        if not np.array_equal(folded, head.T.astype(folded.dtype)):
            continue
        stored = next((n for n, t in inits.items() if n.removeprefix("m.") == name and tuple(t.dims) == head.shape), None)
        if stored is None:  # untied: the tracer kept only the folded transpose
            stored = f"m.{name}"
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(head), stored))
        label = node.name.replace("MatMul", "lm_head")
        weight, nodes = stored, []
        if head.dtype != folded.dtype:
            weight = f"{label}/Cast_output_0"
            nodes.append(helper.make_node("Cast", [stored], [weight], name=f"{label}/Cast", to=cand.data_type))
        nodes.append(helper.make_node("Gemm", [node.input[0], weight], list(node.output), name=label, transB=1))
        g.node.remove(node)
        for j, new in enumerate(nodes):
            g.node.insert(i + j, new)
        g.initializer.remove(cand)
        return
    raise RuntimeError("lm_head MatMul on the transposed output matrix not found; exporter changed?")


def _name_weights(proto: onnx.ModelProto) -> None:
    """Name every initializer by its module path (`h.0.attn.c_attn.weight`), as the tracer
    only does for weights it did not transpose. Graph weights of Linear layers are [in, out]."""
    g = proto.graph
    renames: dict[str, str] = {}
    for node in g.node:
        for name in node.input:
            if name.startswith("onnx::") and node.op_type == "MatMul" and name not in renames:
                module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")  # m.h.0.attn.c_attn
                renames[name] = module.removeprefix("m.") + ".weight"
    for t in g.initializer:
        new = renames.get(t.name, t.name.removeprefix("m."))
        renames[t.name] = new
        t.name = new
    for node in g.node:
        for j, name in enumerate(node.input):
            if name in renames:
                node.input[j] = renames[name]


def graph_io_problems(path: Path, sig: GraphSignature) -> list[str]:
    """Compare a graph's inputs and outputs with the contract; every mismatch, not the first."""
    proto = onnx.load(str(path), load_external_data=False)
    problems = []
    for kind, want, have in (
        ("input", sig.inputs(), graph_inputs(proto)),
        ("output", sig.outputs(), proto.graph.output),
    ):
        have_names = [v.name for v in have]
        want_names = [s.name for s in want]
        if have_names != want_names:
            problems.append(f"graph {kind}s {have_names[:4]}... differ from the contract {want_names[:4]}...")
            continue
        for spec, v in zip(want, have):
            dtype = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
            if dtype != spec.dtype:
                problems.append(f"{kind} {spec.name} is {dtype}, contract says {spec.dtype}")
    return problems


def declare_output_shapes(graph_path: Path, sig: GraphSignature) -> None:
    """Give the graph's outputs the contract's axes: the tracer names the logits' axes itself
    ("Reshapelogits_dim_1"), and onnxruntime-genai reads a fixed 1 there as last-position logits
    (Model::IsPruned; otherwise it binds [batch, prompt, vocab] and the run fails). Only the
    declared shapes change; every computation, and so the parity evidence, stays as it was."""
    proto = onnx.load(str(graph_path), load_external_data=False)
    specs = {s.name: s for s in sig.outputs()}
    for value in proto.graph.output:
        spec = specs.get(value.name)
        dims = value.type.tensor_type.shape.dim
        if spec is None or len(dims) != len(spec.axes):
            continue  # graph_io_problems reports such graphs; nothing here to declare
        for dim, axis in zip(dims, spec.axes):
            if isinstance(axis, int):
                dim.dim_value = axis
            else:
                dim.dim_param = axis
    onnx.save_model(proto, str(graph_path))  # external data stays where it is: only references are written


__all__ = ["OPSET", "declare_output_shapes", "export_onnx", "graph_io_problems", "signature_for"]
