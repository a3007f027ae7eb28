"""The manifest's weights map: each canonical parameter -> the graph initializer that holds it.

Found by value, not by the tracer's names: it must hold for every graph the export ships, and
the passes after the trace rewrite nodes freely (fusion replaces MatMul/LayerNormalization with
Gemm, SkipSimplifiedLayerNormalization and GroupQueryAttention; the tracer stores identical tensors
once). The `torch` runtime reads exactly
these initializers to rebuild gptdeploy.modeling.GPT, whatever the graph's structure.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from gptdeploy.config import GPTConfig
from gptdeploy.errors import ExportError
from gptdeploy.manifest import QUANTIZED, WeightRef

FLOATS = (np.dtype(np.float32), np.dtype(np.float16))
Key = tuple[str, tuple[int, ...], str]  # (dtype, shape, SHA-256 of the bytes)


def graph_weights(config: GPTConfig, state: dict, precision: str, graph: Path) -> dict[str, WeightRef] | None:
    """The map for the graph at `graph`, exported from `state` at `precision`; None for int8/int4."""
    if precision in QUANTIZED:
        return None
    expected = canonical_tensors(config, state, precision)
    proto = onnx.load(str(graph), load_external_data=False)  # tensors are read one at a time below
    found = match_initializers(expected, proto, graph.parent)
    missing = [k for k in expected if k not in found]
    if missing:  # every graph pass keeps the weights' values (tests/test_torch_runtime.py), so: a bug
        raise ExportError(
            f"the {precision} graph holds no initializer equal to {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}, so the torch runtime could not rebuild the model from "
            "it; this is a gptdeploy bug: please report it with the export command"
        )
    return found


def canonical_tensors(config: GPTConfig, state: dict, precision: str) -> dict[str, np.ndarray]:
    """The parameters as the traced module held them: fp16 graphs store `to_fp16`'s dtypes."""
    import torch

    from gptdeploy.modeling import GPT, load_state, to_fp16

    with torch.device("meta"):  # no random init: load_state assigns `state`'s own tensors
        model = GPT(config)
    load_state(model, state)
    if precision == "fp16":
        to_fp16(model)
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def match_initializers(
    expected: dict[str, np.ndarray], proto: onnx.ModelProto, base_dir: Path
) -> dict[str, WeightRef]:
    """Each expected tensor's initializer: equal values, stored as is or transposed (a 2-D weight),
    in the tensor's dtype or, where the cast is exact both ways, another float dtype (an fp16
    weight that a graph keeps as fp32 for a Cast the tracer folded).

    Several parameters may map to one initializer (the tracer's deduplication); among equal
    candidates the parameter's own name wins."""
    stored: dict[Key, list[str]] = {}
    for t in proto.graph.initializer:
        stored.setdefault(_key(numpy_helper.to_array(t, str(base_dir))), []).append(t.name)
    out: dict[str, WeightRef] = {}
    for name, value in expected.items():
        for array, transposed in _candidates(value):
            names = stored.get(_key(array), [])
            if names:
                out[name] = WeightRef(name if name in names else names[0], transposed)
                break
    return out


def _candidates(value: np.ndarray):
    """`value` as it may be stored: its own dtype first, as is before transposed."""
    casts = [value] + [
        c for c in (value.astype(d) for d in FLOATS if d != value.dtype)
        if np.array_equal(c.astype(value.dtype), value)  # exact: the runtime casts it back
    ]
    for array in casts:
        yield array, False
        if array.ndim == 2:
            yield array.T, True


def _key(a: np.ndarray) -> Key:
    a = np.ascontiguousarray(a)
    return a.dtype.str, tuple(a.shape), hashlib.sha256(a.tobytes()).hexdigest()


__all__ = ["canonical_tensors", "graph_weights", "match_initializers"]
