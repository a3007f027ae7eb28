"""Static checks of an exported graph for TensorRT, without a GPU: which ops compute in which
precision (and whether the fp16 rules hold), and whether TensorRT's ONNX parser knows every op.

Types come from `typed_graph` and the rules from `check_precision` (exporters/fp16.py), the ones
export and verify apply, on the graph loaded without its external weights.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from gptdeploy.exporters.fp16 import STANDARD_DOMAINS, TypedGraph, check_precision, typed_graph
from gptdeploy.exporters.tensorrt.operators import OPERATORS, OPSET_MAX, OPSET_MIN, TRT_VERSION

FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
# ONNX element type -> the type names of the TensorRT operator table.
TRT_TYPE = {
    "FLOAT": "FP32",
    "FLOAT16": "FP16",
    "BFLOAT16": "BF16",
    "INT32": "INT32",
    "INT64": "INT64",
    "INT8": "INT8",
    "UINT8": "UINT8",
    "BOOL": "BOOL",
    "DOUBLE": "DOUBLE",
    "INT4": "INT4",
    "FLOAT4E2M1": "FP4",
    "FLOAT8E4M3FN": "FP8",
    "FLOAT8E5M2": "FP8",
}


@dataclass(frozen=True)
class PrecisionPlan:
    """What computes in which precision; `problems` lists every broken fp16 rule."""

    graph: str
    precision: str  # "fp32", "fp16" (some fp16 compute) or the dominant float type's name
    io: dict[str, str]  # graph input/output name -> numpy dtype name
    weights: dict[str, int]  # numpy dtype name -> bytes of initializers
    ops: dict[str, dict[str, int]]  # op type -> {compute dtype: node count}
    kept_fp32: dict[str, int] = field(default_factory=dict)  # the rule ops (and logits) that are fp32
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "graph": self.graph,
            "precision": self.precision,
            "io": self.io,
            "weights": self.weights,
            "ops": self.ops,
            "kept_fp32": self.kept_fp32,
            "problems": self.problems,
        }


def _compute_type(node: onnx.NodeProto, tg: TypedGraph) -> str | None:
    """The float type a node computes in: its first float input, else its first float output."""
    for name in [*node.input, *node.output]:
        if tg.types.get(name) in FLOATS:
            return tg.dtype(name)
    return None


def precision_plan(onnx_path: str | Path, precision: str | None = None) -> PrecisionPlan:
    """What the graph computes in which precision, and every fp16 rule it breaks (`check_precision`;
    `precision` "fp16" adds the rules of a graph declared fp16)."""
    path = Path(onnx_path)
    tg = typed_graph(path)
    weights: Counter = Counter()
    for t in tg.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        weights[tg.dtype(t.name)] += n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    ops: dict[str, Counter] = defaultdict(Counter)
    for node in tg.graph.node:
        ctype = _compute_type(node, tg)
        if ctype:
            ops[node.op_type][ctype] += 1
    compute = Counter()
    for per_type in ops.values():
        compute.update(per_type)
    summary = (
        "fp16"
        if compute.get("float16")
        else ("fp32" if compute.get("float32") else (compute.most_common(1)[0][0] if compute else "none"))
    )
    check = check_precision(tg, precision)
    return PrecisionPlan(
        graph=path.name,
        precision=summary,
        io=tg.io_types(),
        weights=dict(weights),
        ops={k: dict(v) for k, v in sorted(ops.items())},
        kept_fp32=check.kept_fp32,
        problems=check.problems,
    )


def _checked_tensors(node: onnx.NodeProto) -> list[str]:
    """The tensors whose type the operator table's 'Types' column is about."""
    if node.op_type in ("Constant", "ConstantOfShape"):
        return [node.output[0]]
    if node.op_type == "Where":
        return [node.input[1]]  # input 0 is the boolean condition
    if node.op_type in ("Cast", "CastLike"):
        return [node.input[0], node.output[0]]
    return [node.input[0]] if node.input and node.input[0] else []


def _node_problems(node: onnx.NodeProto, types: dict[str, int]) -> list[tuple[str, str]]:
    """(kind, message) for one node; kind groups identical findings across nodes."""
    op = node.op_type
    if node.domain not in STANDARD_DOMAINS:
        return [
            (
                f"{node.domain}.{op}",
                f"{node.domain}.{op} is not a standard ONNX op (an onnxruntime contrib "
                "or custom op); TensorRT's parser needs a plugin for it. Export with --fp16, or "
                "--portable for fp32: graphs without onnxruntime's fusions",
            )
        ]
    support = OPERATORS.get(op)
    if support is None:
        return [(op, f"{op} is not in TensorRT {TRT_VERSION}'s ONNX operator list")]
    if not support.supported:
        return [
            (
                op,
                f"{op} is not supported by TensorRT's ONNX parser"
                + (f" ({support.restrictions})" if support.restrictions else ""),
            )
        ]
    found = []
    for name in _checked_tensors(node):
        onnx_type = TensorProto.DataType.Name(types[name]) if types.get(name) else None
        trt_type = TRT_TYPE.get(onnx_type, onnx_type) if onnx_type else None
        if trt_type and trt_type not in support.types:
            found.append(
                (
                    f"{op}:{trt_type}",
                    f"{op} on {trt_type}; TensorRT's parser takes {', '.join(support.types)}",
                )
            )
    used_outputs = [i for i, n in enumerate(node.output) if n]
    if op == "LayerNormalization" and used_outputs != [0]:
        found.append(
            (op + ":outputs", "LayerNormalization with Mean/InvStdDev outputs; TensorRT returns only Y")
        )
    if op == "Attention" and (any(node.input[4:6]) or any(node.output[1:])):
        found.append(
            (
                op + ":kv",
                "Attention with past_key/past_value inputs or present/qk outputs, which "
                "TensorRT does not support; export the explicit MatMul + Softmax pattern",
            )
        )
    return found


def _walk(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:  # If / Loop / Scan bodies
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _walk(sub)


def check_trt_operators(onnx_path: str | Path) -> list[str]:
    """Every reason TensorRT's ONNX parser would reject the graph, found statically: ops outside the
    operator table, contrib-domain ops, unsupported tensor types, opsets outside the parser's range.
    Identical findings are grouped with their node count and first node. Empty: nothing found."""
    tg = typed_graph(Path(onnx_path))
    model, types = tg.model, tg.types
    problems = []
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS and not OPSET_MIN <= imp.version <= OPSET_MAX:
            problems.append(
                f"opset {imp.version} is outside TensorRT {TRT_VERSION}'s range {OPSET_MIN}..{OPSET_MAX}"
            )
    grouped: dict[str, list] = {}
    for node in _walk(model.graph):
        for kind, message in _node_problems(node, types):
            grouped.setdefault(kind, [message, 0, node.name or node.output[0]])[1] += 1
    for message, count, first in grouped.values():
        problems.append(f"{message} ({count} node{'s' if count > 1 else ''}, first {first})")
    return problems


__all__ = ["PrecisionPlan", "check_trt_operators", "precision_plan"]
