"""Fused fast graphs for onnxruntime on the CPU.

Two passes, and the report says what each one actually did:

1. onnxruntime's transformer optimizer for the norm and GELU fusions ((Skip)Simplified-
   LayerNormalization for RMSNorm, FastGelu / BiasGelu; a LayerNorm stays Add +
   LayerNormalization, which runs faster): exporters/ort_fusions.py. It runs
   first, on standard ops only: its Skip*Normalization fusion needs the shapes its symbolic shape
   inference finds, and that inference stops at GroupQueryAttention's attention output, so after
   the attention pass it fused no norm in audit graphs (measured when GPT-2 graphs still got
   SkipLayerNormalization: GPT-2-124M fp32 audit decode step 22.4 ms, 192 kernels, vs 19.6 ms and
   145 kernels without attention outputs).
2. Attention -> `com.microsoft.GroupQueryAttention`, our own pass (exporters/gqa.py), for every
   family: each layer is found through the initializers that hold its c_attn and c_proj weights
   (by value, as the manifest's weights map), and everything between the two projections becomes
   one node that also writes the KV cache, in place when the runtime shares one buffer between
   past and present (runtimes/ort.py). onnxruntime's own attention fusion recognises only Hugging
   Face's old GPT-2 export with one stacked `past_{i}` per layer (measured: `Attention: 0`).
   Graphs with attention outputs get them from the op's softmax output (qk_output=2).

The Linear layers stay MatMul on (K, N) weights, which onnxruntime pre-packs at load. An earlier
third pass stored them as Gemm(transB=1) on unpacked (N, K) weights for one-row products: ~14%
faster decoding on an AVX2 CPU, but on an AVX-512 one the packed MatMul decodes 1.44x as fast at
batch 1 and 1.65x at batch 8 and prefills in 0.63-0.80x the time, at the same peak RSS
(GPT-2-124M, docs/performance.md), so the pass was removed.

The result uses onnxruntime contrib ops: it is a CPU/onnxruntime graph, never a TensorRT one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from gptdeploy.config import GPTConfig
from gptdeploy.contract import GraphSignature
from gptdeploy.exporters.gqa import fuse_attention
from gptdeploy.exporters.ort_fusions import run_ort_optimizer

log = logging.getLogger(__name__)


@dataclass
class FusionReport:
    """What each pass fused, op by op, and why anything was left alone."""

    attention: int = 0  # layers rewritten as GroupQueryAttention
    optimizer: dict[str, int] = field(default_factory=dict)  # ops onnxruntime's optimizer created, by type
    notes: list[str] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0

    def to_dict(self) -> dict:
        return {
            "GroupQueryAttention (gptdeploy pass)": self.attention,
            "onnxruntime optimizer": self.optimizer,
            "nodes": f"{self.nodes_before} -> {self.nodes_after}",
            "notes": self.notes,
        }


def fuse_graph(
    proto: onnx.ModelProto, config: GPTConfig, sig: GraphSignature, *, params: dict[str, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, FusionReport]:
    """The passes on a copy of `proto` (an fp32 graph). `params`: the canonical tensors, by which
    the attention pass finds each layer (gqa.attention_params); without them it fuses none."""
    fused = onnx.ModelProto()
    fused.CopyFrom(proto)
    report = FusionReport(nodes_before=len(fused.graph.node))
    # onnxruntime's optimizer first, on standard ops: its Skip*Normalization fusion needs the shapes
    # its symbolic shape inference finds, which stops at GroupQueryAttention's attention output
    # (an audit graph's qk_output): run after the attention pass, it fused no norm in audit graphs.
    report.optimizer = run_ort_optimizer(fused, config, report.notes)
    problem = "no parameters to locate the layers by" if params is None else fuse_attention(fused, config, sig, params)
    if problem:
        report.notes.append(f"attention not fused: {problem}")
    else:
        report.attention = config.n_layer
    report.nodes_after = len(fused.graph.node)
    return fused, report


__all__ = ["FusionReport", "fuse_graph"]
