"""int8 and int4 graphs for CPU deployment, made from the verified fp32 graph.

What is quantized, what stays float, and why (the manifest repeats this per bundle):

- Every Linear weight (c_attn, attn c_proj, c_fc, mlp c_proj): int8 through onnxruntime's
  `quantize_dynamic` (weights int8 per tensor, activations uint8 quantized per call, run as
  DynamicQuantizeMatMul), or int4 through `MatMulNBitsQuantizer` (blocks of 128 along the
  input axis, one fp32 scale per block, int8 activations: accuracy_level 4).
- The output projection (lm_head), tied or untied: read in full at every step and a third of
  GPT-2-124M's weights. A tied head gets its own quantized (C, V) copy of the embedding, an
  untied one is quantized as it is; a Gemm on the (V, C) matrix could not be quantized
  (onnxruntime's dynamic quantizer takes MatMul only, and neither quantized MatMul reads a
  transposed weight).
- The token and position embeddings (wte, wpe) stay float: a Gather reads one row per
  token, so quantizing them saves disk, not time, and adds noise to every input. They are
  stored as fp16 (relative rounding 2^-11, ~100x finer than an int8 step) and cast to fp32
  after the Gather, which halves the largest float tensor.
- Norm weights (LayerNorm, RMSNorm, q/k norms), all biases and the rotary's frequencies stay
  fp32: 0.1% of the weights, and the norm statistics are where low precision hurts most.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gptdeploy.exporters.graph_files import (
    MAX_INLINE_WEIGHTS,
    expose_gemv_weights,
    nbytes,
    save_graph,
    weight_bytes,
)

log = logging.getLogger(__name__)

QUANTIZED = ("int8", "int4")
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Scheme:
    """How one precision stores and multiplies its Linear weights."""

    op: str  # "DynamicQuantizeMatMul" (quantize_dynamic) or "MatMulNBits"
    bits: int
    block_size: int = 0  # MatMulNBits: weights per scale, along the input axis
    accuracy_level: int = 0  # MatMulNBits: 4 = activations quantized to int8 per block (VNNI kernels)

    def describe(self) -> str:
        if self.op == "DynamicQuantizeMatMul":
            return "onnxruntime quantize_dynamic: int8 weights (symmetric, per tensor), uint8 activations per call"
        return (f"onnxruntime MatMulNBits: int{self.bits} weights in blocks of {self.block_size} (symmetric, "
                f"fp32 scale per block), accuracy_level {self.accuracy_level}"
                + (" (int8 activations)" if self.accuracy_level == 4 else ""))


SCHEMES = {
    "int8": Scheme("DynamicQuantizeMatMul", 8),
    # Blocks of 128 (the quantizer's default): on GPT-2-124M they decode 1.38x (context 32) and
    # 1.16x (512) as fast as blocks of 32 and prefill 512 tokens in 0.79x the time, at 3% less size
    # (docs/performance.md). Quality, measured: the retrained sample's perplexity +0.57% (32:
    # +0.69%), both within 0.4 nats of greedy margin; 124M random-init +1.2% (32: -0.2%). A first
    # training of the sample once diverged greedily at a 1.10-nat margin with 128 (32: 0.18), inside
    # the int4 bound of 1.5. accuracy_level 4: activations quantized to int8 per block (VNNI kernels);
    # level 0 gave the same perplexity on the sample.
    "int4": Scheme("MatMulNBits", 4, block_size=128, accuracy_level=4),
}


@dataclass
class QuantizationReport:
    method: str
    quantized: dict[str, int] = field(default_factory=dict)  # weight tensor -> elements
    float_tensors: dict[str, str] = field(default_factory=dict)  # tensor -> "dtype: why"
    quantized_bytes: int = 0
    float_bytes: int = 0

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "quantized_tensors": len(self.quantized),
            "quantized_elements": sum(self.quantized.values()),
            "quantized_bytes": self.quantized_bytes,
            "float_bytes": self.float_bytes,
            "float_tensors": self.float_tensors,
        }


def quantize_graph(fp32: onnx.ModelProto, precision: str, scratch: Path) -> tuple[onnx.ModelProto, QuantizationReport]:
    """The `precision` ("int8" or "int4") variant of `fp32` (not modified), in memory, and what was
    quantized; the caller saves it (after its own edits: an int8 KV cache). `scratch`: a directory
    for the files onnxruntime's int8 quantizer works through."""
    if precision not in QUANTIZED:
        raise ValueError(f"precision must be one of {QUANTIZED}, got {precision!r}")
    scheme = SCHEMES[precision]
    proto = onnx.ModelProto()
    proto.CopyFrom(fp32)
    linear = [n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in _inits(proto)]
    sizes = {name: int(np.prod(_inits(proto)[name].dims)) for name in linear}
    untie_lm_head(proto)
    expose_gemv_weights(proto)  # wte is read by the Gather only now: no longer listed as an input
    sizes[LM_HEAD] = int(np.prod(_inits(proto)[LM_HEAD].dims))
    tables = gather_tables_to_fp16(proto)
    quantized = _int8(proto, scratch) if scheme.op == "DynamicQuantizeMatMul" else _nbits(proto, scheme)
    return quantized, _report(quantized, scheme.describe(), sizes, tables)


def _inits(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


def untie_lm_head(proto: onnx.ModelProto) -> None:
    """Gemm(x, W (V, C), transB=1) -> MatMul(x, lm_head.weight (C, V)), quantized next. A tied W is
    wte, which the Gather keeps reading: lm_head.weight is a (C, V) copy of wte.T. An untied W is
    lm_head.weight itself, read by this Gemm alone: transposed in place (no second copy).
    ::
        x ──Gemm(transB=1)── W (V, C)     =>     x ──MatMul── lm_head.weight (C, V)   (quantized next)
    """
    g = proto.graph
    inits = _inits(proto)
    gemm = next((n for n in g.node if n.op_type == "Gemm" and n.input[1] in inits), None)
    if gemm is None or not any(a.name == "transB" and a.i == 1 for a in gemm.attribute):
        raise RuntimeError("lm_head Gemm(transB=1) on the output matrix not found; exporter changed?")
    head = inits[gemm.input[1]]
    readers = sum(name == head.name for n in g.node for name in n.input)
    if readers == 1:  # untied: nothing else reads it
        g.initializer.remove(head)
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(head).T), LM_HEAD))
    i = list(g.node).index(gemm)
    name = gemm.name if "lm_head" in gemm.name else gemm.name + "/lm_head"
    inputs = [gemm.input[0], LM_HEAD]
    g.node.remove(gemm)
    g.node.insert(i, helper.make_node("MatMul", inputs, list(gemm.output), name=name + "/MatMul"))


def gather_tables_to_fp16(proto: onnx.ModelProto) -> list[str]:
    """Store every fp32 table read only by Gather (wte, wpe) as fp16, with a Cast to fp32 after it.
    ::
        wte fp32 ──Gather── x      =>      wte fp16 ──Gather── Cast(fp32) ── x
    """
    g = proto.graph
    inits = _inits(proto)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            if name in inits:
                readers.setdefault(name, []).append(node)
    done = []
    for name, nodes in readers.items():
        t = inits[name]
        if t.data_type != TensorProto.FLOAT or not all(n.op_type == "Gather" and n.input[0] == name for n in nodes):
            continue
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), name))
        for node in nodes:
            out = node.output[0]
            node.output[0] = f"{out}/fp16"
            cast = helper.make_node("Cast", [node.output[0]], [out], name=f"{node.name}/Cast", to=TensorProto.FLOAT)
            g.node.insert(list(g.node).index(node) + 1, cast)
        done.append(name)
    return done


def _int8(proto: onnx.ModelProto, scratch: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        save_graph(proto, src)
        with _quiet():
            quantize_dynamic(
                # Per tensor: per-channel alone was worse on the sample (perplexity +0.56% vs -0.00%,
                # top-1 margin p99 0.66 vs 0.12 nats; with reduce_range it ties), measured.
                src, dst, op_types_to_quantize=["MatMul"], per_channel=False, weight_type=QuantType.QInt8,
                use_external_data_format=weight_bytes(proto) > MAX_INLINE_WEIGHTS,
                # DefaultTensorType: the fused graph's contrib ops have no ONNX type inference.
                extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT},
            )
        return onnx.load(str(dst))  # its external data read in: the caller saves it in our layout


def _nbits(proto: onnx.ModelProto, scheme: Scheme) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with _quiet():
        # Symmetric: ~13% faster decoding than asymmetric on the 124M shape (int4, same run), at
        # +0.69% vs +0.25% perplexity on the sample (measured).
        q = MatMulNBitsQuantizer(
            proto, bits=scheme.bits, block_size=scheme.block_size, is_symmetric=True,
            accuracy_level=scheme.accuracy_level, op_types_to_quantize=("MatMul",),
        )
        q.process()
    return q.model.model


def _report(q: onnx.ModelProto, method: str, sizes: dict[str, int], tables: list[str]) -> QuantizationReport:
    report = QuantizationReport(method)
    quantized_types = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4)
    names = {t.name for t in q.graph.initializer}
    for name, n in sizes.items():
        if name not in names:  # replaced by its quantized form
            report.quantized[name] = n
    for t in q.graph.initializer:
        size = nbytes(t)
        if t.data_type in quantized_types or t.name.endswith(("_scale", "_scales", "_zero_point", "_zero_points")):
            report.quantized_bytes += size
            continue
        report.float_bytes += size
        if t.name in tables:
            why = "Gather table: one row read per token; stored fp16, cast to fp32 after the Gather"
        elif "ln_" in t.name or t.name.endswith("bias") or len(t.dims) <= 1:
            why = "norm parameter, bias or rotary frequency: 0.1% of the weights"
        else:
            continue  # graph constants (shapes, split sizes)
        report.float_tensors[t.name] = f"{helper.tensor_dtype_to_np_dtype(t.data_type).name}: {why}"
    missing = [n for n in sizes if n not in report.quantized]
    if missing:
        raise RuntimeError(f"{method}: linear weights left unquantized: {missing[:4]}")
    return report


class _quiet:
    """onnxruntime's quantizers log a pre-processing suggestion at WARNING on every call."""

    def __enter__(self):
        self._root = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self._root)


__all__ = ["QUANTIZED", "SCHEMES", "QuantizationReport", "Scheme", "gather_tables_to_fp16", "quantize_graph", "untie_lm_head"]
