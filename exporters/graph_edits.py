"""Small in-place edits of ONNX graphs that the graph passes (fusion, gqa, ort_fusions) share."""

from __future__ import annotations

import onnx
from onnx import helper

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops



def insert_before(g: onnx.GraphProto, anchor: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
    i = list(g.node).index(anchor)
    for j, n in enumerate(nodes):
        g.node.insert(i + j, n)


def ensure_opset(proto: onnx.ModelProto, domain: str) -> None:
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


__all__ = ["MS_DOMAIN", "ensure_opset", "insert_before", "remove_dead_nodes"]
