"""The static checks of a graph for TensorRT, without a GPU: the precision plan (the fp16 rules of
exporters/fp16.py, as build-engine applies them) and the operator check of real exported graphs
and of hand-made ones, against the operator table generated from NVIDIA's list."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from gptdeploy import contract as io
from gptdeploy.bundle import Bundle
from gptdeploy.exporters.tensorrt.checks import check_trt_operators, precision_plan
from gptdeploy.exporters.tensorrt.operators import OPERATORS
from tests.runtime_bundles import made

REFERENCE = Path("/work/shared/reference/tensorrt-onnx-operators.md")


@pytest.fixture(scope="module")
def graph() -> Path:
    b = Bundle.load(made("small").bundle)
    return b.file(b.graph().file)


def test_precision_plan_of_an_exported_fp32_graph(graph):
    plan = precision_plan(graph)
    assert plan.ok and plan.precision == "fp32"
    assert set(plan.weights) == {"float32"}
    assert plan.io[io.LOGITS] == "float32" and plan.io[io.past_key(0)] == "float32"
    assert plan.kept_fp32["LayerNormalization"] == 2 * 2 + 1 and plan.kept_fp32["Softmax"] == 2
    assert plan.kept_fp32["logits"] == 1 and plan.kept_fp32["attentions"] == 2
    assert plan.ops["MatMul"] == {"float32": plan.ops["MatMul"]["float32"]}
    json.dumps(plan.to_dict())


def _fp16_graph(path: Path, *, ln_fp32: bool, softmax_fp32: bool, logits_fp32: bool) -> Path:
    """x (fp16) -> LayerNorm -> MatMul (fp16 weight) -> Softmax -> logits; Casts where the rules ask."""
    F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
    nodes, inits = (
        [],
        [
            helper.make_tensor("w", F16, [4, 4], np.eye(4, dtype=np.float16).ravel().tolist()),
            helper.make_tensor("g", F32 if ln_fp32 else F16, [4], [1.0] * 4),
            helper.make_tensor("b", F32 if ln_fp32 else F16, [4], [0.0] * 4),
        ],
    )
    x = "x"
    if ln_fp32:
        nodes.append(helper.make_node("Cast", ["x"], ["x32"], to=F32))
        x = "x32"
    nodes.append(helper.make_node("LayerNormalization", [x, "g", "b"], ["ln"], name="ln_f"))
    ln = "ln"
    if ln_fp32:
        nodes.append(helper.make_node("Cast", ["ln"], ["ln16"], to=F16))
        ln = "ln16"
    nodes.append(helper.make_node("MatMul", [ln, "w"], ["h"], name="lm_head"))
    h = "h"
    if softmax_fp32:
        nodes.append(helper.make_node("Cast", ["h"], ["h32"], to=F32))
        h = "h32"
    nodes.append(helper.make_node("Softmax", [h], ["p"], axis=-1, name="probs"))
    p_type = F32 if softmax_fp32 else F16
    out = "p"
    if logits_fp32 and not softmax_fp32:
        nodes.append(helper.make_node("Cast", ["p"], [io.LOGITS], to=F32))
        out, p_type = io.LOGITS, F32
    elif not logits_fp32 and softmax_fp32:
        nodes.append(helper.make_node("Cast", ["p"], [io.LOGITS], to=F16))
        out, p_type = io.LOGITS, F16
    else:
        nodes.append(helper.make_node("Identity", [out], [io.LOGITS]))
    g = helper.make_graph(
        nodes,
        "fp16",
        [helper.make_tensor_value_info("x", F16, [1, 4])],
        [helper.make_tensor_value_info(io.LOGITS, p_type, [1, 4])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_precision_plan_of_fp16_graphs_checks_the_fp32_rules(tmp_path):
    good = precision_plan(
        _fp16_graph(tmp_path / "good.onnx", ln_fp32=True, softmax_fp32=True, logits_fp32=True)
    )
    assert good.ok, good.problems
    assert good.precision == "fp16" and good.ops["MatMul"] == {"float16": 1}
    assert good.kept_fp32 == {"LayerNormalization": 1, "Softmax": 1, "logits": 1}
    assert good.weights == {"float16": 32, "float32": 32}
    # Declared fp16 (build-engine passes the graph's precision), the export rules apply as well: this
    # toy has no lm_head Gemm feeding the logits.
    declared = precision_plan(tmp_path / "good.onnx", "fp16")
    assert declared.problems == ["no lm_head found; an fp16 graph computes its lm_head in float32"]
    bad = precision_plan(
        _fp16_graph(tmp_path / "bad.onnx", ln_fp32=False, softmax_fp32=False, logits_fp32=False)
    )
    text = " | ".join(bad.problems)
    assert "LayerNormalization ln_f computes in float16" in text
    assert "Softmax probs computes in float16" in text
    assert f"output {io.LOGITS} is float16; it must be float32" in text
    assert len(bad.problems) == 3


def test_precision_plan_and_operator_check_of_an_exported_fp16_graph(tmp_path):
    import torch

    from gptdeploy import modeling
    from gptdeploy.config import GPTConfig
    from gptdeploy.exporters.onnx import export_onnx

    torch.manual_seed(0)
    model = modeling.to_fp16(
        modeling.GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32))
    )
    sig, _ = export_onnx(model.eval(), tmp_path / "fp16.onnx")
    plan = precision_plan(tmp_path / "fp16.onnx")
    assert plan.ok, plan.problems
    assert (
        plan.precision == "fp16" and plan.io[io.past_key(0)] == "float16" and plan.io[io.LOGITS] == "float32"
    )
    assert set(plan.ops["MatMul"]) == {"float16"}  # weights and attention products
    assert plan.kept_fp32 == {"LayerNormalization": 5, "Softmax": 2, "logits": 1, "attentions": 2}
    assert precision_plan(tmp_path / "fp16.onnx", "fp16").ok  # the export-time fp16 rules hold too
    assert check_trt_operators(tmp_path / "fp16.onnx") == []


def test_exported_graph_passes_the_operator_check(graph):
    assert check_trt_operators(graph) == []


def _graph_with(nodes, inputs, outputs, opset=17, extra_opsets=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def test_operator_check_finds_contrib_ops_unsupported_ops_and_types(tmp_path):
    F = TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    contrib = _graph_with(
        [
            helper.make_node(
                "SkipLayerNormalization", ["x", "x", "g", "b"], ["y"], domain="com.microsoft", name="sln"
            ),
            helper.make_node("Unique", ["y"], ["u"], name="uniq"),
            helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64),
            helper.make_node("Softmax", ["xi"], ["s"], name="int_softmax"),
            helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln", "mean"], name="ln_stats"),
        ],
        [vi("x", F, [2, 4]), vi("g", F, [4]), vi("b", F, [4])],
        [vi("u", F, None), vi("s", TensorProto.INT64, [2, 4]), vi("ln", F, [2, 4]), vi("mean", F, None)],
        extra_opsets=[helper.make_opsetid("com.microsoft", 1)],
    )
    onnx.save(contrib, str(tmp_path / "c.onnx"))
    problems = check_trt_operators(tmp_path / "c.onnx")
    text = " | ".join(problems)
    assert "com.microsoft.SkipLayerNormalization is not a standard ONNX op" in text and "first sln" in text
    assert "Unique is not supported by TensorRT's ONNX parser" in text
    assert "Softmax on INT64; TensorRT's parser takes FP32, FP16, BF16" in text
    assert "LayerNormalization with Mean/InvStdDev outputs" in text
    assert len(problems) == 4
    new_opset = _graph_with(
        [helper.make_node("Relu", ["x"], ["y"])], [vi("x", F, [1])], [vi("y", F, [1])], opset=25
    )
    onnx.save(new_opset, str(tmp_path / "o.onnx"))
    assert check_trt_operators(tmp_path / "o.onnx") == ["opset 25 is outside TensorRT 10.15's range 9..24"]


def test_repeated_findings_are_grouped_with_their_count(tmp_path):
    F = TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    nodes = [
        helper.make_node("MatMulNBits", ["x"], [f"y{i}"], domain="com.microsoft", name=f"q{i}")
        for i in range(3)
    ]
    m = _graph_with(
        nodes,
        [vi("x", F, [1])],
        [vi(f"y{i}", F, None) for i in range(3)],
        extra_opsets=[helper.make_opsetid("com.microsoft", 1)],
    )
    onnx.save(m, str(tmp_path / "m.onnx"))
    (problem,) = check_trt_operators(tmp_path / "m.onnx")
    assert problem.endswith("(3 nodes, first q0)")


@pytest.mark.skipif(not REFERENCE.is_file(), reason=f"{REFERENCE} is not on this machine")
def test_operator_table_matches_the_reference_document():
    want = {}
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| ") or line.startswith(("| Operator", "|---")):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.sub(r"\*\*\(.*?\)\*\*", "", cells[0])
        types = tuple(t.strip() for t in cells[2].split(",") if t.strip())
        for name in (n.strip() for n in names.split("/")):
            want[name] = (cells[1].startswith("Y"), types, cells[3])
    have = {name: (s.supported, s.types, s.restrictions) for name, s in OPERATORS.items()}
    assert have == want
