"""The fp16 graph checked without a GPU: a CPU evaluator that really computes in fp16, and the
static fp16 rules (its fp32 islands) on one type inference, shared by export, verify and
build-engine (exporters/tensorrt/checks.py).

onnxruntime's CPU provider lacks fp16 kernels for most ops and silently wraps them in Casts
to fp32, so its numbers say little about fp16 numerics. onnx's reference evaluator (numpy)
computes every op on fp16 values and rounds every result to fp16. We replace only its
MatMul, whose numpy fp16 loop runs at ~0.2 GFLOP/s (measured; a 124M model would need
seconds per token): fp16 inputs, products and sums in fp32, result rounded to fp16 once,
which is what GPU tensor cores do (exact fp16 products, fp32 accumulation).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper

from gptdeploy import contract as io

CPU_PATH = (
    "onnx.reference.ReferenceEvaluator (numpy) on the CPU: every op computes on fp16 values and "
    "rounds each result to fp16; MatMul takes fp16 inputs, accumulates in fp32 and rounds once "
    "(tensor-core semantics); norms, rotary, softmax and logits run in fp32 as the graph says"
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


# ------------------------------------------------------------------- the typed graph and its rules


@dataclass(frozen=True)
class TypedGraph:
    """A model after ONNX shape inference, with the element type of every tensor it names."""

    model: onnx.ModelProto
    types: dict[str, int]  # tensor name -> TensorProto element type (0: unknown)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    def dtype(self, name: str) -> str:
        """numpy's name for a tensor's type ("float16"), or "unknown"."""
        t = self.types.get(name, 0)
        return helper.tensor_dtype_to_np_dtype(t).name if t else "unknown"

    def io_types(self) -> dict[str, str]:
        return {v.name: self.dtype(v.name) for v in [*self.graph.input, *self.graph.output]}


def typed_graph(model: onnx.ModelProto | str | Path) -> TypedGraph:
    """The one type inference of every static check. A path is loaded without its external weights
    (initializers keep dtype and dims), so a 2 GB+ graph is typed in a few MB."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return TypedGraph(inferred, types)


# The fp32 islands, by the op that computes each: LayerNorm is one op; an RMSNorm is Pow ->
# ReduceMean -> Add -> Sqrt (the ReduceMean of the squares is the only ReduceMean the canonical
# module emits); the rotary's cos and sin are its Cos and Sin.
ISLAND_OPS = {"LayerNormalization": "layernorm", "ReduceMean": "rmsnorm", "Sin": "rope", "Cos": "rope",
              "Softmax": "softmax"}
NORMS = ("layernorm", "rmsnorm")


def _island_nodes(tg: TypedGraph) -> dict[str, list[onnx.NodeProto]]:
    """The nodes the fp16 rules are about, by kind: LayerNorm, RMSNorm, rotary, Softmax, the
    lm_head Gemm, MatMuls with a weight operand, and ops outside standard ONNX."""
    g, inits = tg.graph, {t.name for t in tg.graph.initializer}
    kinds = (*dict.fromkeys(ISLAND_OPS.values()), "lm_head", "weight_matmul", "non_standard")
    out: dict[str, list] = {kind: [] for kind in kinds}
    for node in g.node:
        if node.domain not in STANDARD_DOMAINS:
            out["non_standard"].append(node)
        elif node.op_type in ISLAND_OPS:
            out[ISLAND_OPS[node.op_type]].append(node)
        elif node.op_type == "Gemm" and io.LOGITS in _consumers_until_output(g, node):
            out["lm_head"].append(node)
        elif node.op_type == "MatMul" and node.input[1] in inits:
            out["weight_matmul"].append(node)
    return out


def precision_islands(model: onnx.ModelProto | TypedGraph) -> dict[str, list[str]]:
    """Element types the graph computes in, by the ops that matter: what the norms, the rotary,
    Softmax and the lm_head read, what the weight MatMuls read, and which ops are not standard ONNX."""
    tg = model if isinstance(model, TypedGraph) else typed_graph(model)
    nodes = _island_nodes(tg)
    kinds = (*dict.fromkeys(ISLAND_OPS.values()), "lm_head")
    out = {kind: [tg.dtype(n.input[0]) for n in nodes[kind]] for kind in kinds}
    out["weight_matmul"] = [tg.dtype(n.input[1]) for n in nodes["weight_matmul"]]
    out["non_standard"] = [f"{n.op_type} ({n.domain})" for n in nodes["non_standard"]]
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


@dataclass(frozen=True)
class PrecisionCheck:
    """What `check_precision` found: the fp32 islands kept, and every rule broken."""

    kept_fp32: dict[str, int]  # rule ops and outputs found in float32, by op type or output kind
    problems: list[str]  # every broken rule; empty: the graph keeps them all


def check_precision(tg: TypedGraph, precision: str | None = None) -> PrecisionCheck:
    """The fp16 rules (DESIGN.md, TensorRT), checked once for export, verify and build-engine. Every
    graph: the norms (LayerNorm, RMSNorm), the rotary's cos/sin, Softmax, the lm_head and the
    logits / attentions outputs in float32, past and present KV of one dtype. A graph declared
    "fp16" also: fp16 weights and KV cache, a norm, Softmax and lm_head present, standard ONNX only
    (TensorRT's parser refuses onnxruntime contrib ops)."""
    nodes, io_types = _island_nodes(tg), tg.io_types()
    kept: Counter = Counter()
    problems: list[str] = []
    for node in [n for kind in dict.fromkeys(ISLAND_OPS.values()) for n in nodes[kind]]:
        wrong = [n for n in (node.input[0], node.output[0]) if tg.types.get(n) != TensorProto.FLOAT]
        if wrong:
            problems.append(
                f"{node.op_type} {node.name or node.output[0]} computes in {tg.dtype(wrong[0])}; "
                "the fp16 rules keep it in float32"
            )
        else:
            kept[node.op_type] += 1
    for node in nodes["lm_head"]:
        if tg.types.get(node.input[0]) != TensorProto.FLOAT:
            name, got = node.name or node.output[0], tg.dtype(node.input[0])
            problems.append(f"lm_head {name} reads {got}; the fp16 rules compute the logits in float32")
    outputs = {v.name for v in tg.graph.output}
    for name in [io.LOGITS] + [io.attention(i) for i in range(len(outputs)) if io.attention(i) in outputs]:
        if name in io_types and io_types[name] != "float32":
            problems.append(f"output {name} is {io_types[name]}; it must be float32")
        elif name in io_types:
            kept["logits" if name == io.LOGITS else "attentions"] += 1
    kv = _kv_pairs(tg, io_types)
    problems += [f"{past} is {io_types[past]} but {present} is {io_types[present]}"
                 for past, present in kv if io_types[past] != io_types[present]]
    if precision == "fp16":
        problems += _fp16_only(tg, nodes, [name for pair in kv for name in pair], io_types)
    return PrecisionCheck(dict(kept), problems)


def _kv_pairs(tg: TypedGraph, io_types: dict[str, str]) -> list[tuple[str, str]]:
    """(past, present) of every layer's key and value the graph has, by the contract's names."""
    pairs = [pair for i in range(len(tg.graph.input))
             for pair in ((io.past_key(i), io.present_key(i)), (io.past_value(i), io.present_value(i)))]
    return [(past, present) for past, present in pairs if past in io_types and present in io_types]


def _fp16_only(tg: TypedGraph, nodes: dict, kv: list[str], io_types: dict[str, str]) -> list[str]:
    """The rules only an fp16 graph has to keep: what it computes in fp16, and that its islands exist."""
    problems = []
    if nodes["non_standard"]:
        found = sorted({f"{n.op_type} ({n.domain})" for n in nodes["non_standard"]})
        problems.append(f"non-standard ops {found}; TensorRT's parser refuses onnxruntime contrib ops")
    if not any(nodes[kind] for kind in NORMS):
        problems.append("no layernorm or rmsnorm found; an fp16 graph computes its norms in float32")
    for kind in ("softmax", "lm_head"):
        if not nodes[kind]:
            problems.append(f"no {kind} found; an fp16 graph computes its {kind} in float32")
    weights = sorted({tg.dtype(n.input[1]) for n in nodes["weight_matmul"]})
    if weights != ["float16"]:
        problems.append(f"weight MatMuls must be float16, found {weights}")
    wrong = [name for name in kv if io_types[name] != "float16"]
    if wrong:
        problems.append(f"KV cache tensors must be float16: {wrong[:3]}")
    return problems


__all__ = [
    "CPU_PATH",
    "Fp16CpuSession",
    "PrecisionCheck",
    "TypedGraph",
    "check_precision",
    "precision_islands",
    "typed_graph",
]
