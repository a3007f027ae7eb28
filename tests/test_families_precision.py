"""Precision variants for the other families: fp16 (its fp32 islands: RMSNorm, rotary, softmax,
logits; TensorRT's operator check), int8 / int4 (tied and untied heads quantized, bounds against
the fp32 graph) and fused graphs without attention outputs (what was fused, and why not)."""

from __future__ import annotations

import onnx
import pytest

from gptdeploy import Generator
from gptdeploy.exporters.export import export_bundle
from gptdeploy.exporters.fp16 import precision_islands
from gptdeploy.exporters.tensorrt.checks import check_trt_operators, precision_plan
from tests.factories import make_hf_dir

VARIANTS = {
    "fp16": {"precision": "fp16"},
    "fast": {"attentions": False},
    "int8": {"precision": "int8"},
    "int4-fast": {"precision": "int4", "attentions": False},
}
FAMILIES = {  # llama: RMSNorm, SwiGLU, GQA, untied; gpt_neox: LayerNorm, partial rotary, untied; qwen2: tied
    "llama": {},
    "gpt_neox": {},
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
}
PARAMS = ["llama", pytest.param("gpt_neox", marks=pytest.mark.slow), pytest.param("qwen2", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each family's bundles, one per variant, exported once for the module."""
    root, made = tmp_path_factory.mktemp("families-precision"), {}

    def get(family: str) -> dict:
        if family not in made:
            src = make_hf_dir(root / family / "src", family, seed=1, **FAMILIES[family])
            made[family] = {k: export_bundle(src, root / family / k, **kw) for k, kw in VARIANTS.items()}
        return made[family]

    return get


@pytest.mark.parametrize("family", PARAMS)
def test_fp16_keeps_its_fp32_islands_and_parses_for_tensorrt(exported, family):
    result = exported(family)["fp16"]
    assert result.parity.passed, result.parity.describe_failures()
    path = result.bundle.file(result.bundle.graph().file)
    isl = precision_islands(onnx.load(str(path)))
    cfg = result.bundle.config
    norm = "rmsnorm" if cfg.norm == "rmsnorm" else "layernorm"
    assert set(isl[norm]) == {"float32"} and len(isl[norm]) == 2 * cfg.n_layer + 1
    assert set(isl["rope"]) == {"float32"} and set(isl["softmax"]) == {"float32"}
    assert isl["lm_head"] == ["float32"] and set(isl["weight_matmul"]) == {"float16"}
    assert isl["non_standard"] == []
    plan = precision_plan(path, "fp16")
    assert plan.ok, plan.problems
    assert check_trt_operators(path) == []
    heads = [t for t in onnx.load(str(path)).graph.initializer if t.name in ("wte.weight", "lm_head.weight")]
    assert {t.data_type for t in heads} == {onnx.TensorProto.FLOAT16}  # the head is stored once, fp16


@pytest.mark.parametrize("family", PARAMS)
def test_quantized_heads_and_bounds(exported, family):
    for name in ("int8", "int4-fast"):
        result = exported(family)[name]
        precision = result.bundle.graph().precision
        rec = result.bundle.manifest.parity[precision]
        assert result.parity.passed and rec["passed"], result.parity.describe_failures()
        q = rec["graph"]["quantization"]
        n = result.bundle.config.n_layer
        assert q["quantized_tensors"] == 4 * n + 1  # every Linear and the head, tied or untied
        assert "lm_head.weight" not in q["float_tensors"] and q["float_tensors"]["wte.weight"].startswith("float16")
        assert rec["graph"]["fp32_parity"]["passed"]


@pytest.mark.parametrize("family", PARAMS)
def test_fused_graph_reports_what_it_fused(exported, family):
    result = exported(family)["fast"]
    info = result.bundle.manifest.parity["fp32"]["graph"]
    assert result.parity.passed and info["fused"] is True, info
    fusion = info["fusion"]
    n = result.bundle.config.n_layer
    # Rotary, GQA, partial rotary and the window all inside one GroupQueryAttention per layer;
    # these tiny shapes' rotary widths (4, 2, 4 of cos_cache) are not multiples of 8, so the
    # rotary runs in RotaryEmbedding before it (exporters/gqa.py; tests/test_fused_attention.py
    # covers the in-op rotary). The graph can share one buffer between past and present.
    assert fusion["GroupQueryAttention (gptdeploy pass)"] == n and result.bundle.graph().kv_shared_buffer
    ops = [node.op_type for node in onnx.load(str(result.bundle.file("model.onnx"))).graph.node]
    assert ops.count("GroupQueryAttention") == n and ops.count("RotaryEmbedding") == 2 * n
    assert ops.count("MatMul") == 4 * n  # the Linear layers, on weights onnxruntime pre-packs
    if result.bundle.config.norm == "rmsnorm":  # residual Add + RMSNorm fused; a LayerNorm stays Add +
        assert fusion["onnxruntime optimizer"].get("SkipSimplifiedLayerNormalization", 0) >= 1  # LayerNormalization
    else:  # (faster on the CPU: exporters/ort_fusions.py)
        assert "SkipLayerNormalization" not in ops and ops.count("LayerNormalization") == 2 * n + 1
    onnx.checker.check_model(str(result.bundle.file("model.onnx")))  # no ONNX-domain contrib ops left


@pytest.mark.parametrize("family", PARAMS)
def test_every_variant_generates_through_both_runtimes(exported, family):
    bundles = exported(family)
    for name, result in bundles.items():
        backends = ("ort",) if name.startswith("int") else ("ort", "torch")  # torch runs float graphs only
        outs = []
        for backend in backends:
            with Generator.load(result.bundle.path, backend=backend) as gen:
                outs.append([r.token_ids for r in gen.generate(["你好", "The quick"], max_new_tokens=8)])
        assert all(all(o) for o in outs), name
        if name == "fast":  # fp32 both: the same tokens (fp16 on onnxruntime's CPU path may break near-ties)
            assert outs[0] == outs[1], outs


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_fp16_exports_for_the_other_families(family, tmp_path):
    """The window (Mistral: CumSum and the windowed bias in the graph) and the q/k norms (Qwen3)
    in fp16, within the fp16 bounds, and parseable by TensorRT."""
    result = export_bundle(make_hf_dir(tmp_path / "src", family, seed=2), tmp_path / "fp16", precision="fp16")
    assert result.parity.passed, result.parity.describe_failures()
    path = result.bundle.file(result.bundle.graph().file)
    assert precision_plan(path, "fp16").ok and check_trt_operators(path) == []
