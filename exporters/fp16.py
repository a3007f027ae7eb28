"""The fp16 graph checked without a GPU: a CPU evaluator that really computes in fp16, and a
static check of the graph's fp32 islands.

onnxruntime's CPU provider lacks fp16 kernels for most ops and silently wraps them in Casts
to fp32, so its numbers say little about fp16 numerics. onnx's reference evaluator (numpy)
computes every op on fp16 values and rounds every result to fp16. We replace only its
MatMul, whose numpy fp16 loop runs at ~0.2 GFLOP/s (measured; a 124M model would need
seconds per token): fp16 inputs, products and sums in fp32, result rounded to fp16 once,
which is what GPU tensor cores do (exact fp16 products, fp32 accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper

from gptdeploy import contract as io
from gptdeploy.contract import GraphSignature

CPU_PATH = (
    "onnx.reference.ReferenceEvaluator (numpy) on the CPU: every op computes on fp16 values and "
    "rounds each result to fp16; MatMul takes fp16 inputs, accumulates in fp32 and rounds once "
    "(tensor-core semantics); LayerNorm, softmax and logits run in fp32 as the graph says"
)
STANDARD_DOMAINS = ("", "ai.onnx")  # anything else (com.microsoft) is onnxruntime-only: TensorRT refuses it


def _matmul_class(constants: frozenset[str]):
    from onnx.reference.op_run import OpRun

    class MatMul(OpRun):  # the evaluator finds overrides by class name and domain
        op_domain = ""
        _fp32: ClassVar[dict[str, np.ndarray]] = {}  # fp32 copies of constant fp16 weights, by initializer name

        def _run(self, a, b):
            if a.dtype != np.float16:
                return (np.matmul(a, b),)
            name = self.onnx_node.input[1]
            if name in constants:
                b32 = self._fp32.get(name)
                if b32 is None:
                    b32 = self._fp32[name] = b.astype(np.float32)
            else:
                b32 = b.astype(np.float32)
            return (np.matmul(a.astype(np.float32), b32).astype(np.float16),)

    return MatMul


@dataclass(frozen=True)
class _Output:
    name: str


class Fp16CpuSession:
    """The subset of onnxruntime.InferenceSession that parity uses, over the fp16 CPU evaluator."""

    path_description = CPU_PATH

    def __init__(self, path: Path):
        from onnx.reference import ReferenceEvaluator

        proto = onnx.load(str(path))
        constants = frozenset(t.name for t in proto.graph.initializer)
        self._outputs = [_Output(o.name) for o in proto.graph.output]
        self._evaluator = ReferenceEvaluator(proto, new_ops=[_matmul_class(constants)])

    def get_outputs(self) -> list[_Output]:
        return list(self._outputs)

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._evaluator.run(output_names, feeds))


def precision_islands(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """Element types the graph computes in, by the ops that matter: what LayerNorm, Softmax and
    the lm_head read, what the weight MatMuls read, and which ops are not standard ONNX."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types |= {t.name: t.data_type for t in g.initializer}
    name = lambda t: helper.tensor_dtype_to_np_dtype(t).name if t else "unknown"
    inits = {t.name for t in g.initializer}
    out: dict[str, list[str]] = {"layernorm": [], "softmax": [], "lm_head": [], "weight_matmul": [], "non_standard": []}
    for node in g.node:
        if node.domain not in STANDARD_DOMAINS:
            out["non_standard"].append(f"{node.op_type} ({node.domain})")
        elif node.op_type == "LayerNormalization":
            out["layernorm"].append(name(types.get(node.input[0])))
        elif node.op_type == "Softmax":
            out["softmax"].append(name(types.get(node.input[0])))
        elif node.op_type == "Gemm" and io.LOGITS in _consumers_until_output(g, node):
            out["lm_head"].append(name(types.get(node.input[0])))
        elif node.op_type == "MatMul" and node.input[1] in inits:
            out["weight_matmul"].append(name(types.get(node.input[1])))
    return out


def _consumers_until_output(g: onnx.GraphProto, node: onnx.NodeProto) -> set[str]:
    """Graph outputs reachable from `node` through Reshape/Cast only (the lm_head's path to logits)."""
    outputs = {o.name for o in g.output}
    frontier, reached = list(node.output), set()
    while frontier:
        t = frontier.pop()
        if t in outputs:
            reached.add(t)
        frontier += [o for n in g.node if t in n.input and n.op_type in ("Reshape", "Cast") for o in n.output]
    return reached


def fp16_graph_problems(proto: onnx.ModelProto, sig: GraphSignature) -> list[str]:
    """Every way the graph breaks the fp16 contract: fp16 weights and KV cache, fp32 LayerNorm,
    softmax and logits, standard ONNX only (TensorRT's parser refuses onnxruntime contrib ops)."""
    isl = precision_islands(proto)
    problems = []
    if isl["non_standard"]:
        problems.append(f"non-standard ops {sorted(set(isl['non_standard']))}")
    for kind in ("layernorm", "softmax", "lm_head"):
        bad = [t for t in isl[kind] if t != "float32"]
        if bad or not isl[kind]:
            problems.append(f"{kind} must compute in float32, found {isl[kind] or 'none'}")
    if set(isl["weight_matmul"]) != {"float16"}:
        problems.append(f"weight MatMuls must be float16, found {sorted(set(isl['weight_matmul']))}")
    kv = set(sig.past_names()) | set(sig.present_names())
    io_values = [*proto.graph.input, *proto.graph.output]
    wrong = [v.name for v in io_values if v.name in kv and v.type.tensor_type.elem_type != TensorProto.FLOAT16]
    if wrong:
        problems.append(f"KV cache tensors must be float16: {wrong[:3]}")
    return problems


__all__ = ["CPU_PATH", "Fp16CpuSession", "fp16_graph_problems", "precision_islands"]
