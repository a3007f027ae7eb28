"""The `torch-cuda` runtime: the canonical PyTorch module on an NVIDIA GPU, in the graph's precision.

The same code as the `torch` reference (runtimes/torch.py), moved to CUDA: the PyTorch-eager
baseline that `bench` sets beside `ort-cuda` and `tensorrt`, and a GPU check that needs neither
onnxruntime-gpu nor TensorRT. TF32 stays off (torch's default for matmuls), so fp32 results
differ from the CPU only by summation order.
"""

from __future__ import annotations

import torch

from gptdeploy.bundle import Bundle
from gptdeploy.manifest import GraphEntry
from gptdeploy.runtimes.torch import TorchRuntime


def missing() -> str | None:
    if torch.cuda.is_available():
        return None
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"torch {torch.__version__} ({build}) sees no CUDA device; the torch-cuda backend needs an NVIDIA "
        "GPU and a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu128)"
    )


def open_runtime(bundle: Bundle, graph: GraphEntry, threads: int | None) -> TorchRuntime:
    return TorchRuntime(bundle, graph, threads, device="cuda")
