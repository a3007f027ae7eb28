"""Fused fast graphs for onnxruntime on the CPU.

Three passes, and the report says what each one actually did:

1. Attention -> `com.microsoft.GroupQueryAttention`, our own pass (exporters/gqa.py), for every
   family: each layer is found through the initializers that hold its c_attn and c_proj weights
   (by value, as the manifest's weights map), and everything between the two projections becomes
   one node that also writes the KV cache, in place when the runtime shares one buffer between
   past and present (runtimes/ort.py). onnxruntime's own attention fusion recognises only Hugging
   Face's old GPT-2 export with one stacked `past_{i}` per layer (measured: `Attention: 0`).
   Graphs with attention outputs get them from the op's softmax output (qk_output=2).
2. onnxruntime's transformer optimizer for the norm and GELU fusions (SkipLayerNormalization,
   (Skip)SimplifiedLayerNormalization, FastGelu / BiasGelu): exporters/ort_fusions.py.
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

from gptdeploy import contract as io
from gptdeploy.config import GPTConfig
from gptdeploy.contract import GraphSignature
from gptdeploy.exporters.gqa import fuse_attention
from gptdeploy.exporters.ort_fusions import run_ort_optimizer

log = logging.getLogger(__name__)


@dataclass
class FusionReport:
    """What each pass fused, op by op, and why anything was left alone."""

    attention: int = 0  # layers rewritten as GroupQueryAttention
    gemv: int = 0  # Linear MatMuls rewritten as Gemm(transB=1) on unpacked weights (fp32 decode layout)
    optimizer: dict[str, int] = field(default_factory=dict)  # ops onnxruntime's optimizer created, by type
    notes: list[str] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0

    def to_dict(self) -> dict:
        return {
            "GroupQueryAttention (gptdeploy pass)": self.attention,
            "Linear as unpacked Gemm(transB=1) (gptdeploy pass)": self.gemv,
            "onnxruntime optimizer": self.optimizer,
            "nodes": f"{self.nodes_before} -> {self.nodes_after}",
            "notes": self.notes,
        }


def fuse_graph(
    proto: onnx.ModelProto, config: GPTConfig, sig: GraphSignature, decode_layout: bool = False,
    *, params: dict[str, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, FusionReport]:
    """The passes on a copy of `proto` (an fp32 graph); with `decode_layout` (a graph that ships as
    fp32, not one to quantize), then `linears_as_gemv`. `params`: the canonical tensors, by which
    the attention pass finds each layer (gqa.attention_params); without them it fuses none."""
    fused = onnx.ModelProto()
    fused.CopyFrom(proto)
    report = FusionReport(nodes_before=len(fused.graph.node))
    problem = "no parameters to locate the layers by" if params is None else fuse_attention(fused, config, sig, params)
    if problem:
        report.notes.append(f"attention not fused: {problem}")
    else:
        report.attention = config.n_layer
    report.optimizer = run_ort_optimizer(fused, config, report.notes)
    if decode_layout:
        from gptdeploy.exporters.gemv import linears_as_gemv

        report.gemv = linears_as_gemv(fused, io.INPUT_IDS)
    report.nodes_after = len(fused.graph.node)
    return fused, report


__all__ = ["FusionReport", "fuse_graph"]
