"""TensorRT planning without a GPU: optimization profiles and their equal-dimension constraints,
engine names and manifest entries, the compatibility check on load, the precision plan and the
operator check of real exported graphs, and the CLI's errors when TensorRT or a GPU is missing."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from gptdeploy import contract as io
from gptdeploy import engines
from gptdeploy.bundle import Bundle
from gptdeploy.contract import GraphSignature
from gptdeploy.engines import (
    compat_check,
    engine_filename,
    engine_manifest_entry,
    select_engine,
    trt_release,
)
from gptdeploy.errors import BundleError, ExportError
from gptdeploy.exporters.tensorrt.checks import check_trt_operators, precision_plan
from gptdeploy.exporters.tensorrt.operators import OPERATORS
from gptdeploy.profiles import PHASES, buffer_shapes, check_limits, check_profiles, profile_shapes
from tests.fake_tensorrt import FakeCudart, install_cudart, make_tensorrt
from tests.runtime_bundles import copy_bundle, made

REFERENCE = Path("/work/shared/reference/tensorrt-onnx-operators.md")
SIGS = [
    GraphSignature(n_layer=2, n_head=2, kv_heads=2, head_dim=16, vocab_size=297),
    GraphSignature(n_layer=3, n_head=8, kv_heads=2, head_dim=8, vocab_size=320, kv_dtype="float16"),  # GQA
    GraphSignature(n_layer=12, n_head=12, kv_heads=12, head_dim=64, vocab_size=50257, attentions=False),
    GraphSignature(n_layer=1, n_head=4, kv_heads=4, head_dim=4, vocab_size=64, last_logits_only=True),
]


# ------------------------------------------------------------------------------ profiles


def _axis_values(sig, shapes, k):
    """{axis name: set of values} over every input's k-th (min/opt/max) shape."""
    seen = {}
    for spec in sig.inputs():
        for axis, value in zip(spec.axes, shapes[spec.name][k]):
            if isinstance(axis, str):
                seen.setdefault(axis, set()).add(value)
    return seen


@pytest.mark.parametrize("sig", SIGS, ids=["gpt2-tiny", "gqa-fp16", "gpt2-124m", "last-logits"])
@pytest.mark.parametrize("max_batch", [1, 2, 4, 7])
@pytest.mark.parametrize("max_context", [2, 3, 16, 1024])
def test_profiles_respect_every_constraint_over_a_grid(sig, max_batch, max_context):
    profiles = profile_shapes(sig, max_batch, max_context)
    assert check_profiles(sig, profiles, max_context) == []
    assert list(profiles) == list(PHASES)
    for phase, shapes in profiles.items():
        assert list(shapes) == [s.name for s in sig.inputs()]  # every input, graph order
        for k in range(3):
            seen = _axis_values(sig, shapes, k)
            assert all(len(v) == 1 for v in seen.values()), (phase, k, seen)  # one batch, one past, ...
            (b,), (t,), (p,), (total,) = (seen[a] for a in (io.BATCH, io.SEQ, io.PAST, io.TOTAL))
            assert total == p + t and b >= 1 and t >= 1
            assert shapes[io.POSITION_IDS][k] == shapes[io.INPUT_IDS][k]
            assert shapes[io.ATTENTION_MASK][k] == (b, p + t)
            for past in sig.past_names():
                assert shapes[past][k] == (b, sig.kv_heads, p, sig.head_dim)
            if phase == "prefill":
                assert p == 0
            else:
                assert t == 1 and p >= 1
    pre, dec = profiles["prefill"], profiles["decode"]
    assert pre[io.INPUT_IDS][2] == (max_batch, max_context) and pre[io.INPUT_IDS][0] == (1, 1)
    assert dec[sig.past_names()[0]][2][2] == max_context - 1 and dec[sig.past_names()[0]][0][2] == 1
    assert dec[io.ATTENTION_MASK][2] == (max_batch, max_context)


@settings(max_examples=150, deadline=None)
@given(
    max_batch=st.integers(1, 64),
    max_context=st.integers(2, 8192),
    opt_batch=st.integers(1, 64),
    opt_context=st.integers(1, 8192),
    sig=st.sampled_from(SIGS),
)
def test_profiles_property(max_batch, max_context, opt_batch, opt_context, sig):
    if opt_batch > max_batch or opt_context > max_context:
        with pytest.raises(ExportError, match="opt batch"):
            profile_shapes(sig, max_batch, max_context, opt_batch, opt_context)
        return
    profiles = profile_shapes(sig, max_batch, max_context, opt_batch, opt_context)
    assert check_profiles(sig, profiles, max_context) == []
    assert profiles["prefill"][io.INPUT_IDS][1] == (opt_batch, opt_context)
    assert profiles["decode"][io.ATTENTION_MASK][1] == (opt_batch, min(opt_context, max_context - 1) + 1)


def _tamper(profiles, phase, name, k, shape):
    out = {ph: {n: list(t) for n, t in shapes.items()} for ph, shapes in profiles.items()}
    out[phase][name][k] = shape
    return {ph: {n: tuple(t) for n, t in shapes.items()} for ph, shapes in out.items()}


def test_check_profiles_reports_every_broken_rule():
    sig = SIGS[0]
    good = profile_shapes(sig, 4, 16)
    past0 = sig.past_names()[0]
    cases = [
        (_tamper(good, "decode", io.ATTENTION_MASK, 2, (4, 15)), "length 15 != past 15 \\+ seq 1"),
        (_tamper(good, "prefill", io.POSITION_IDS, 1, (2, 8)), "axis batch_size differs"),
        (
            _tamper(good, "prefill", past0, 0, (1, 2, 1, 16)),
            "past must be 0|axis past_sequence_length differs",
        ),
        (_tamper(good, "decode", io.INPUT_IDS, 2, (4, 2)), "axis sequence_length differs|needs seq 1"),
        (_tamper(good, "prefill", io.INPUT_IDS, 0, (2, 1)), "breaks 0 <= min <= opt <= max"),
        (_tamper(good, "decode", past0, 1, (1, 3, 7, 16)), "has 3 where the graph fixes 2"),
    ]
    for profiles, pattern in cases:
        problems = check_profiles(sig, profiles)
        assert problems and any(re.search(pattern, p) for p in problems), (pattern, problems)
    missing = {ph: {n: t for n, t in shapes.items() if n != past0} for ph, shapes in good.items()}
    assert "missing or unexpected" in check_profiles(sig, missing)[0]
    assert "exceed max context 8" in " ".join(check_profiles(sig, good, max_context=8))
    assert check_profiles(sig, {"prefill": good["prefill"]})[0].startswith("profiles must be exactly")


@pytest.mark.parametrize(
    "batch, context, model, pattern",
    [
        (0, 16, None, "max batch must be an integer >= 1"),
        (1, 1, None, "max context must be an integer >= 2"),
        (True, 16, None, "max batch"),
        (2, 65, 64, "exceeds the model's 64 positions; use --max-context 64"),
    ],
)
def test_impossible_limits_are_one_line_errors(batch, context, model, pattern):
    with pytest.raises(ExportError, match=pattern):
        check_limits(batch, context, model)


def test_buffers_are_sized_so_pasts_and_presents_can_swap():
    sig = SIGS[1]
    shapes = buffer_shapes(sig, 4, 128)
    for past, present in zip(sig.past_names(), sig.present_names()):
        assert shapes[past] == shapes[present] == (4, 2, 128, 8)
    assert shapes[io.LOGITS] == (4, 128, 320) and shapes[io.attention(0)] == (4, 8, 128, 128)
    assert buffer_shapes(SIGS[3], 2, 8)[io.LOGITS] == (2, 1, 64)


# -------------------------------------------------------------------- names, entries, compat


def test_engine_names_say_gpu_tensorrt_release_and_precision():
    assert engine_filename("9.0", "10.13.0.35", "fp16") == "sm90-trt10.13.0-fp16.engine"
    assert engine_filename((8, 6), "10.8.0", "fp32") == "sm86-trt10.8.0-fp32.engine"
    assert engine_filename("12.0", "11.1", "fp16") == "sm120-trt11.1.0-fp16.engine"
    assert (
        engine_filename("8.9", "10.13.0.35", "fp16", hardware_compat=True)
        == "sm80plus-trt10.13.0-fp16.engine"
    )
    assert trt_release("10.13.0.35") == "10.13.0" and trt_release("10") == "10.0.0"
    assert engines.timing_cache_filename("9.0", "10.13.0.35") == "engines/timing-sm90-trt10.13.0.cache"


def _entry(**over) -> dict:
    sig = SIGS[0]
    kw = dict(
        file="engines/sm90-trt10.13.0-fp16.engine",
        sha256="ab" * 32,
        graph="fp16",
        precision="fp16",
        compute_capability="9.0",
        trt_version="10.13.0.35",
        profiles=profile_shapes(sig, 4, 1024),
        max_batch=4,
        max_context=1024,
        workspace_bytes=4 << 30,
        hardware_compat=False,
        version_compat=False,
        flags=["STRONGLY_TYPED", "no TF32"],
        timing_cache="engines/timing-sm90-trt10.13.0.cache",
        device_name="NVIDIA H100 80GB HBM3",
        build_seconds=41.5,
    )
    kw.update(over)
    return engine_manifest_entry(**kw)


def test_manifest_entry_records_file_hash_target_profiles_and_settings():
    e = _entry()
    again = json.loads(json.dumps(e))  # plain JSON, as the manifest stores it
    assert again == e
    assert (
        e["compute_capability"] == "9.0" and e["trt_version"] == "10.13.0" and e["trt_build"] == "10.13.0.35"
    )
    assert e["limits"] == {"max_batch": 4, "max_context": 1024}
    assert e["hardware_compat"] == "none" and e["version_compatible"] is False
    assert e["profiles"]["decode"][io.ATTENTION_MASK] == [[1, 2], [1, 513], [4, 1024]]
    assert e["workspace_bytes"] == 4 << 30 and e["flags"] == ["STRONGLY_TYPED", "no TF32"]
    assert set(engines.ENTRY_FIELDS) <= set(e)


REBUILD = "gptdeploy build-engine out/fp16 --graph fp16 --max-batch 4 --max-context 1024"


def test_compat_check_accepts_the_same_target_and_explains_every_other():
    e = _entry()
    assert compat_check(e, "9.0", "10.13.0.40", "out/fp16") is None  # another build of the same release
    gpu = compat_check(e, (8, 6), "10.13.0", "out/fp16")
    assert "built for compute capability 9.0; this GPU is 8.6" in gpu and gpu.endswith(REBUILD)
    ver = compat_check(e, "9.0", "10.14.1", "out/fp16")
    assert "built with TensorRT 10.13.0; this machine has 10.14.1" in ver and ver.endswith(REBUILD)
    vc = _entry(version_compat=True)
    assert compat_check(vc, "9.0", "10.15.0", "b") is None
    assert "needs TensorRT 10.13.0 or later" in compat_check(vc, "9.0", "10.12.0", "b")
    assert compat_check(vc, "9.0", "10.12.0", "b").endswith("--version-compat")
    hw = _entry(hardware_compat=True, compute_capability="8.9")
    assert compat_check(hw, "8.0", "10.13.0") is None and compat_check(hw, "12.0", "10.13.0") is None
    assert "Ampere or newer" in compat_check(hw, "7.5", "10.13.0") and "--hardware-compat" in compat_check(
        hw, "7.5", "10.13.0"
    )
    bad = {"file": "engines/x.engine", "graph": "fp32"}
    assert "malformed (missing sha256" in compat_check(bad, "9.0", "10.13.0")
    assert "malformed (trt_version" in compat_check({**e, "trt_version": "ten"}, "9.0", "10.13.0")


def test_select_engine_picks_the_one_that_runs_here():
    h100, a10 = _entry(), _entry(file="engines/sm86-trt10.13.0-fp16.engine", compute_capability="8.6")
    assert select_engine([h100, a10], "fp16", "8.6", "10.13.0") is a10
    with pytest.raises(
        BundleError, match=r"no TensorRT engine for graph 'fp32'; build one: gptdeploy build-engine b"
    ):
        select_engine([h100, a10], "fp32", "9.0", "10.13.0", "b")
    with pytest.raises(BundleError, match=r"no engine in the bundle runs here: .*9\.0.*\| .*8\.6"):
        select_engine([h100, a10], "fp16", "7.5", "10.13.0")


# ---------------------------------------------------------- precision plan, operator check


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

    if not hasattr(modeling, "to_fp16"):
        pytest.skip("gptdeploy.modeling.to_fp16 (the fp16 graph export) is not in this tree yet")
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


# ------------------------------------------------------------------------ the CLI's errors


@pytest.fixture
def cli_group():
    """The lead's group when it registers the commands; otherwise the same error mapping around them."""
    from gptdeploy import cli as cli_mod
    from gptdeploy.cli.engine import build_engine, doctor

    if "build-engine" in cli_mod.cli.commands:
        return cli_mod.cli
    return cli_mod._Group(commands={"build-engine": build_engine, "doctor": doctor})


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    return copy_bundle(made("small").bundle, tmp_path / "b")


def _one_line_error(result, pattern):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]


def test_build_engine_without_tensorrt_names_it_and_the_install_command(cli_group, bundle_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    result = CliRunner().invoke(cli_group, ["build-engine", str(bundle_copy)])
    _one_line_error(result, r"TensorRT is not installed .*pip install 'gptdeploy\[tensorrt\]'")
    assert not (bundle_copy / "engines").exists()


def test_build_engine_without_cuda_python_or_without_a_gpu(cli_group, bundle_copy, monkeypatch):
    cudart = FakeCudart(devices=0)
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(cudart))
    for name in ("cuda", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    result = CliRunner().invoke(cli_group, ["build-engine", str(bundle_copy)])
    _one_line_error(result, r"cuda-python is not installed .*pip install 'gptdeploy\[tensorrt\]'")
    install_cudart(monkeypatch, cudart)
    result = CliRunner().invoke(cli_group, ["build-engine", str(bundle_copy)])
    _one_line_error(result, r"no NVIDIA GPU is visible to CUDA")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--max-context", "1"], r"Invalid value for '?--max-context'?: 1 is below 2"),
        (["--max-context", "129"], r"max context 129 exceeds the model's 128 positions"),
        (["--max-batch", "0"], r"Invalid value for '?--max-batch'?"),
        (["--workspace-gb", "0"], r"Invalid value for '?--workspace-gb'?"),
        (["--graph", "fp16"], r"bundle has no graph 'fp16'; it has fp32"),
    ],
)
def test_build_engine_rejects_bad_limits_before_looking_for_tensorrt(
    cli_group, bundle_copy, monkeypatch, args, pattern
):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = CliRunner().invoke(cli_group, ["build-engine", str(bundle_copy), *args])
    assert result.exit_code == 2, result.output
    assert re.search(pattern, result.output), result.output
    assert "TensorRT is not installed" not in result.output


def test_build_engine_on_a_missing_bundle_is_one_line(cli_group, tmp_path):
    result = CliRunner().invoke(cli_group, ["build-engine", str(tmp_path / "nope")])
    _one_line_error(result, r"bundle .*nope does not exist")


def test_commands_are_click_commands_with_their_names():
    from gptdeploy.cli.engine import build_engine, doctor

    assert isinstance(build_engine, click.Command) and build_engine.name == "build-engine"
    assert isinstance(doctor, click.Command) and doctor.name == "doctor"
