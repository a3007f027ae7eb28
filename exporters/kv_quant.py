"""An int8 KV cache for fused CPU graphs (`--kv-cache int8`): GroupQueryAttention keeps past and
present keys and values as int8 with one static fp32 scale per KV head and channel, as llama.cpp
offers q8_0 cache types. At context 512 the attention of GPT-2-124M's 12 layers then takes
1.3 instead of 3.3 ms a decode step on one thread (shared buffer both; MultiHeadAttention with
copying: 8.0 ms), measured (docs/performance.md).

    past_key_values.{i}.key int8 (B, nkv, P, hs) ─GroupQueryAttention(k_scale, v_scale (1, nkv, 1, hs),
        k_quant_type = v_quant_type = PER_CHANNEL, kv_cache_bit_width 8)─ present.{i}.key int8

The scales come from the fp32 graph itself: sampled continuations of the parity prompts, each
channel's largest |K| and |V| over them, with HEADROOM; values past it saturate. Calibration
never sees the held-out text the graph is then judged on. Offered for int8 and int4 graphs,
whose bounds (perplexity, greedy margins against the fp32 graph: gptdeploy/parity.py
TOLERANCES) measure everything the graph does, the cache included; fp32 graphs are held to
1e-4 on every present, which an int8 cache cannot meet.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gptdeploy.contract import GraphSignature

HEADROOM = 1.25  # scale = HEADROOM * max |x| / 127: calibration text is short, held-out text may go further
CALIBRATION_STEPS = 128  # sampled tokens per parity prompt
KV_CACHE = ("float", "int8")  # what `--kv-cache` accepts: the graph's own float dtype, or int8


def calibrate(session, sig: GraphSignature, prompts: list[list[int]], pad_id: int, vocab: int,
              block_size: int, seed: int = 1) -> list[np.ndarray]:
    """Per past name (K0, V0, K1, ...): scales (1, nkv, 1, hs) from the fp32 graph's own K and V on
    continuations sampled at temperature 1 from each parity prompt."""
    from gptdeploy.exporters.evaltext import sample_rows
    from gptdeploy.runtimes.session import SessionRuntime
    from gptdeploy.steps import Steps

    steps = min(CALIBRATION_STEPS, block_size - max(len(p) for p in prompts))
    chain = Steps(SessionRuntime(session, sig, "fp32"), prompts, pad_id, room=steps)
    rng = np.random.default_rng(seed)
    out = chain.prefill()
    for _ in range(steps - 1):
        out = chain.decode(sample_rows(out.logits, vocab, rng))
    real = chain.mask.astype(bool)  # (B, S): pad positions never enter the statistics
    scales = []
    for name in sig.present_names():
        kv = out.outputs[name].transpose(0, 2, 1, 3)[real]  # (real positions, nkv, hs)
        peak = np.abs(kv).max(0)[None, :, None, :]  # (1, nkv, 1, hs)
        scales.append((HEADROOM * np.maximum(peak, 1e-6) / 127).astype(np.float32))
    return scales


def int8_kv_cache(proto: onnx.ModelProto, sig: GraphSignature, scales: list[np.ndarray]) -> GraphSignature:
    """Turn every layer's GroupQueryAttention to an int8 cache with `scales`, in place; returns the
    graph's new signature (kv_dtype int8). The graph must be fused (gqa.py) and keep its IO names."""
    g = proto.graph
    by_present = {n.output[1]: n for n in g.node if n.op_type == "GroupQueryAttention"}
    for i in range(sig.n_layer):
        node = by_present.get(sig.present_names()[2 * i])
        if node is None:
            raise ValueError(f"layer {i}: no GroupQueryAttention writes {sig.present_names()[2 * i]}")
        names = []
        for j, kind in ((2 * i, "k"), (2 * i + 1, "v")):
            names.append(f"/attention/h.{i}/{kind}_scale")
            g.initializer.append(numpy_helper.from_array(scales[j], names[-1]))
        inputs = list(node.input) + [""] * (17 - len(node.input))
        inputs[12], inputs[13] = names  # k_scale, v_scale (the op's inputs 12 and 13)
        node.input[:] = inputs
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
    kv_names = set(sig.past_names()) | set(sig.present_names())
    for value in [*g.input, *g.output]:
        if value.name in kv_names:
            value.type.tensor_type.elem_type = TensorProto.INT8
    return replace(sig, kv_dtype="int8")


__all__ = ["CALIBRATION_STEPS", "HEADROOM", "KV_CACHE", "calibrate", "int8_kv_cache"]
