"""Static checks of an exported graph for TensorRT, without a GPU: which ops compute in which
precision (and whether the fp16 rules hold), and whether TensorRT's ONNX parser knows every op.

Types come from ONNX shape inference on the graph loaded without its external weights (the
initializers keep their dtype and dims), so a 2 GB+ graph is checked in a few MB of memory.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from gptdeploy import contract as io
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
# The fp16 rules (DESIGN.md, TensorRT section): these stay fp32 in an fp16 graph.
FP32_OPS = ("LayerNormalization", "Softmax")
DEFAULT_DOMAINS = ("", "ai.onnx")


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


def _load_typed(path: Path) -> tuple[onnx.ModelProto, dict[str, int]]:
    model = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return inferred, types


def _np(elem_type: int) -> str:
    return helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else "unknown"


def _compute_type(node: onnx.NodeProto, types: dict[str, int]) -> int:
    """The float type a node computes in: its first float input, else its first float output."""
    for name in [*node.input, *node.output]:
        if types.get(name) in FLOATS:
            return types[name]
    return 0


def precision_plan(onnx_path: str | Path) -> PrecisionPlan:
    """Read the graph's dtypes and check the fp16 rules: LayerNorm, Softmax and the logits (and the
    audit graph's attention outputs) in fp32; past and present KV of one dtype."""
    path = Path(onnx_path)
    model, types = _load_typed(path)
    g = model.graph
    io_types = {v.name: _np(v.type.tensor_type.elem_type) for v in [*g.input, *g.output]}
    weights: Counter = Counter()
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= d
        weights[_np(t.data_type)] += n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    ops: dict[str, Counter] = defaultdict(Counter)
    kept: Counter = Counter()
    problems: list[str] = []
    for node in g.node:
        ctype = _compute_type(node, types)
        if ctype:
            ops[node.op_type][_np(ctype)] += 1
        if node.op_type in FP32_OPS:
            wrong = [n for n in [node.input[0], node.output[0]] if types.get(n) != TensorProto.FLOAT]
            if wrong:
                problems.append(
                    f"{node.op_type} {node.name or node.output[0]} computes in "
                    f"{_np(types.get(wrong[0], 0))}; the fp16 rules keep it in float32"
                )
            else:
                kept[node.op_type] += 1
    outputs = {v.name for v in g.output}
    rule_outputs = [io.LOGITS] + [io.attention(i) for i in range(len(outputs)) if io.attention(i) in outputs]
    for name in rule_outputs:
        if name in io_types and io_types[name] != "float32":
            problems.append(f"output {name} is {io_types[name]}; it must be float32")
        elif name in io_types:
            kept["logits" if name == io.LOGITS else "attentions"] += 1
    for i in range(len(g.input)):
        for past, present in ((io.past_key(i), io.present_key(i)), (io.past_value(i), io.present_value(i))):
            if past in io_types and present in io_types and io_types[past] != io_types[present]:
                problems.append(f"{past} is {io_types[past]} but {present} is {io_types[present]}")
    compute = Counter()
    for per_type in ops.values():
        compute.update(per_type)
    precision = (
        "fp16"
        if compute.get("float16")
        else ("fp32" if compute.get("float32") else (compute.most_common(1)[0][0] if compute else "none"))
    )
    return PrecisionPlan(
        graph=path.name,
        precision=precision,
        io=io_types,
        weights=dict(weights),
        ops={k: dict(v) for k, v in sorted(ops.items())},
        kept_fp32=dict(kept),
        problems=problems,
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
    if node.domain not in DEFAULT_DOMAINS:
        return [
            (
                f"{node.domain}.{op}",
                f"{node.domain}.{op} is not a standard ONNX op (an onnxruntime contrib "
                "or custom op); TensorRT's parser needs a plugin for it. Export without "
                "onnxruntime graph fusions",
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
    model, types = _load_typed(Path(onnx_path))
    problems = []
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS and not OPSET_MIN <= imp.version <= OPSET_MAX:
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
