"""Writing a graph: weights inline or in a memory-mappable `<name>.data` file, and which
initializers a graph lists as inputs (the Gemm(transB=1) weights read unpacked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import set_external_data, write_external_data_tensors

PROTO_LIMIT = 2**31 - 1  # protobuf cannot serialize a message past 2 GB
MAX_INLINE_WEIGHTS = PROTO_LIMIT - (64 << 20)  # leave room for the graph itself
DATA_SUFFIX = ".data"
EXTERNAL_MIN_BYTES = 32 << 20  # graphs with more weights keep them in a memory-mappable file
INLINE_MAX_BYTES = 1024  # smaller tensors (shapes, LayerNorm parameters of tiny models) stay inline
ALIGN = 64 << 10  # mmap needs page-aligned offsets on Linux, 64 KiB (allocation granularity) on Windows


def save_graph(proto: onnx.ModelProto, path: Path, external_data: bool | None = None) -> str | None:
    """Write `proto` to `path`; returns the external-data file name, or None.

    external_data None: weights of EXTERNAL_MIN_BYTES or more go to `<name>.data`, each large
    tensor at an ALIGN-aligned offset so that onnxruntime memory-maps it instead of copying it
    (ONNX's ExternalData.md: offsets must be page / allocation-granularity multiples for mmap).
    On GPT-2-124M that and `expose_gemv_weights` take the `ort` runtime's peak memory from 919 to
    576 MiB, 1.89x to 1.19x the weights plus KV cache (measured; README "Memory").
    True forces it, False forbids it.
    """
    path = Path(path)
    expose_gemv_weights(proto)
    nbytes = weight_bytes(proto)
    if external_data is None:
        external_data = nbytes >= EXTERNAL_MIN_BYTES
    if not external_data and nbytes > MAX_INLINE_WEIGHTS:
        raise ValueError(f"{path.name}: {nbytes} bytes of weights need an external data file")
    data_file = path.name + DATA_SUFFIX if external_data else None
    if data_file:
        # Created here, empty: onnx would create it 0600; this way it gets the user's umask.
        (path.parent / data_file).write_bytes(b"")
        _to_external_data(proto, data_file)
        write_external_data_tensors(proto, str(path.parent))
    onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=False)
    return data_file


def weight_bytes(proto: onnx.ModelProto) -> int:
    return sum(nbytes(t) for t in proto.graph.initializer)


def _to_external_data(proto: onnx.ModelProto, data_file: str) -> None:
    """Point every initializer of INLINE_MAX_BYTES or more at `data_file`, large ones aligned."""
    offset = 0
    for t in proto.graph.initializer:
        if not t.HasField("raw_data"):
            if nbytes(t) < INLINE_MAX_BYTES:
                continue
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))  # typed fields -> raw
        n = len(t.raw_data)
        if n < INLINE_MAX_BYTES:
            continue
        if n >= ALIGN:
            offset = -(-offset // ALIGN) * ALIGN
        set_external_data(t, data_file, offset, n)
        offset += n


def expose_gemv_weights(proto: onnx.ModelProto) -> None:
    """List every initializer a Gemm(transB=1) reads as its B as a graph input (an overridable
    initializer), and no other initializer.

    onnxruntime does not treat an overridable initializer as constant, so it does not pre-pack
    it: the Gemm reads the stored (N, K) matrix in place, row by row. That Gemm is every graph's
    lm_head, on the (V, C) output matrix (the tied embedding, or an untied lm_head). Pre-packing
    would copy the whole matrix (a third of GPT-2's weights) into a private buffer (while the
    Gather keeps the original, when tied). The lm_head is a one-row GEMV at every step (decode,
    and prefill with last-position logits), where the unpacked kernel is as fast as the packed one
    (4.97 vs 5.30 ms for (1, 768) x (50257, 768)^T, measured).

    TensorRT's parser treats such inputs as weights. Idempotent. When the lm_head is untied
    for quantization, its listing is removed.
    """
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    gemv = {
        n.input[1] for n in g.node
        if n.op_type == "Gemm" and n.input[1] in inits and any(a.name == "transB" and a.i == 1 for a in n.attribute)
    }
    for v in [v for v in g.input if v.name in inits and v.name not in gemv]:
        g.input.remove(v)
    listed = {v.name for v in g.input}
    for name in sorted(gemv - listed):
        g.input.append(helper.make_tensor_value_info(name, inits[name].data_type, list(inits[name].dims)))


def graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph's runtime inputs: its inputs less the overridable initializers."""
    inits = {t.name for t in proto.graph.initializer}
    return [v for v in proto.graph.input if v.name not in inits]


def nbytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


__all__ = ["ALIGN", "DATA_SUFFIX", "EXTERNAL_MIN_BYTES", "INLINE_MAX_BYTES", "MAX_INLINE_WEIGHTS", "expose_gemv_weights",
           "graph_inputs", "nbytes", "save_graph", "weight_bytes"]
