"""The `torch` runtime on every graph kind the export makes: it rebuilds the canonical module from
the manifest's weights map (found by value at export), so fused graphs run too, and it matches the
`ort` runtime on the same bundle; int8/int4 graphs are refused with a command that works."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from gptdeploy import Generator
from gptdeploy.bundle import Bundle
from gptdeploy.cli import cli
from gptdeploy.config import GPTConfig
from gptdeploy.errors import BackendUnavailable, BundleError
from gptdeploy.exporters.export import export_bundle
from gptdeploy.exporters.weights_map import canonical_tensors, match_initializers
from gptdeploy.manifest import MANIFEST
from gptdeploy.modeling import GPT
from gptdeploy.parity import RELATIVE, TOLERANCES
from gptdeploy.runtimes.backends import open_runtime
from gptdeploy.runtimes.torch import mapped_state_dict
from tests.factories import make_hf_gpt2_dir, make_nanogpt_ckpt
from tests.runtime_bundles import left_padded

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

KINDS = {  # every graph kind `gptdeploy export` makes
    "fp32": {},  # audit graph fused for onnxruntime: GroupQueryAttention returns the attention outputs
    "fp32-fused": {"attentions": False},  # GroupQueryAttention, FastGelu, no attention outputs
    "fp32-portable": {"portable": True},  # standard ONNX: MatMul, LayerNormalization, Softmax
    "fp16": {"precision": "fp16"},
    "fp16-no-attentions": {"precision": "fp16", "attentions": False},  # stays unfused (TensorRT)
    "int8": {"precision": "int8"},
    "int4": {"precision": "int4"},
}
FLOAT = ["fp32", "fp32-fused", "fp32-portable", "fp16", "fp16-no-attentions"]
QUANTIZED = ["int8", "int4"]
PROMPTS = ["The quick brown fox", "你好", "A deploy bundle carries"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> Bundle, each exported (with parity) on first use from one tiny random GPT-2."""
    root = tmp_path_factory.mktemp("torch-runtime")
    src = make_hf_gpt2_dir(root / "src", n_layer=2, n_head=2, n_embd=32, n_positions=64, seed=2)
    made: dict[str, Bundle] = {}

    def get(kind: str) -> Bundle:
        if kind not in made:
            made[kind] = export_bundle(src, root / kind, **KINDS[kind]).bundle
        return made[kind]

    return get


def _param_names(config: GPTConfig) -> set[str]:
    with torch.device("meta"):
        return set(GPT(config).state_dict())


def _teacher_forced_logits(bundle: Bundle, backend: str, steps: int = 6) -> list[np.ndarray]:
    """Prefill a left-padded batch, then decode a fixed token sequence: the same inputs for every runtime."""
    ids, mask, pos = left_padded([6, 3], bundle.manifest.tokenizer.vocab_size, seed=4)
    feed = np.random.default_rng(5).integers(0, bundle.manifest.tokenizer.vocab_size, size=(steps, 2, 1))
    with open_runtime(bundle, backend, threads=1) as rt:
        out = [rt.prefill(ids, mask, pos).logits]
        for nxt in feed:
            mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            out.append(rt.decode(nxt, mask, pos).logits)
    return out


@pytest.mark.parametrize("kind", FLOAT)
def test_weights_map_covers_the_model_with_initializers_of_the_graph(exported, kind):
    bundle = exported(kind)
    graph = bundle.graph()
    proto = onnx.load(str(bundle.file(graph.file)), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    assert set(graph.weights) == _param_names(bundle.config)
    assert {ref.initializer for ref in graph.weights.values()} <= inits
    assert json.loads((bundle.path / MANIFEST).read_text())["graphs"][graph.name]["weights"]
    linear = [ref.transposed for k, ref in graph.weights.items() if k.endswith(("c_attn.weight", "c_fc.weight"))]
    ops = {n.op_type for n in proto.graph.node}
    if kind == "fp32-fused":  # the reported defect: the tracer's attention and GELU nodes are fused away
        assert {"GroupQueryAttention", "FastGelu", "Gemm"} <= ops
        assert "Softmax" not in ops  # the tracer's attention nodes are one GroupQueryAttention per layer
    assert all(linear)  # MatMul reads (in, out)


@pytest.mark.parametrize("kind", FLOAT)
def test_torch_matches_ort_on_the_same_bundle(exported, kind):
    """Logits within the table's bound at every step, and the same greedy tokens end to end. fp16
    graphs: onnxruntime rounds activations to fp16, the reference computes in fp32 from the same
    fp16 weights, so the fp16 row applies (relative to max |logit|; measured ~1e-4 absolute)."""
    bundle = exported(kind)
    precision = bundle.graph().precision
    tol = TOLERANCES[precision]["logits"][0]
    want, got = _teacher_forced_logits(bundle, "torch"), _teacher_forced_logits(bundle, "ort")
    for step, (w, g) in enumerate(zip(want, got)):
        bound = tol * float(np.abs(w).max()) if "logits" in RELATIVE.get(precision, ()) else tol
        assert float(np.abs(w - g).max()) <= bound, (kind, step)
    with Generator.load(bundle.path, backend="torch") as ref, Generator.load(bundle.path, backend="ort", threads=1) as ort:
        assert ref.runtime.name == "torch"
        want_ids = [r.token_ids for r in ref.generate(PROMPTS, max_new_tokens=12)]
        assert [r.token_ids for r in ort.generate(PROMPTS, max_new_tokens=12)] == want_ids


def test_cli_generate_backend_torch_runs_a_fused_bundle(exported):
    """The reported defect, as a user met it: `generate BUNDLE hi --backend torch` on --no-attentions."""
    path = str(exported("fp32-fused").path)
    runs = {b: CliRunner().invoke(cli, ["generate", path, "hi", "--backend", b, "--threads", "1",
                                        "--max-new-tokens", "8", "--json"]) for b in ("torch", "ort")}
    for backend, r in runs.items():
        assert r.exit_code == 0, (backend, r.output, r.exception)
    assert json.loads(runs["torch"].stdout)["token_ids"] == json.loads(runs["ort"].stdout)["token_ids"]


@pytest.mark.parametrize("kind", QUANTIZED)
def test_quantized_graphs_are_refused_naming_commands_that_work(exported, kind):
    bundle = exported(kind)
    assert bundle.graph().weights is None  # no float Linear weights to map
    hint = f"use --backend ort, or export without --{kind} for a torch reference"
    with pytest.raises(BackendUnavailable, match=f"graph '{kind}' holds {kind} weights; .*{hint}"):
        open_runtime(bundle, "torch")
    r = CliRunner().invoke(cli, ["generate", str(bundle.path), "hi", "--backend", "torch"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and hint in r.stderr, r.output
    r = CliRunner().invoke(cli, ["generate", str(bundle.path), "hi", "--backend", "ort", "--max-new-tokens", "2"])
    assert r.exit_code == 0, r.output  # the first command the hint names works


def test_identical_tensors_stored_once_map_to_one_initializer(tmp_path):
    """A fresh model's LayerNorms are all ones and zeros: the tracer keeps one copy, fused or not."""
    from gptdeploy.exporters.fusion import fuse_graph
    from gptdeploy.exporters.gqa import attention_params
    from gptdeploy.exporters.graph_files import save_graph
    from gptdeploy.exporters.onnx import export_onnx

    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=50, block_size=32, bias=True)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    export_onnx(model, tmp_path / "audit.onnx")
    sig, _ = export_onnx(model, tmp_path / "plain.onnx", attentions=False, last_logits_only=True)
    params = attention_params({k: v.numpy() for k, v in model.state_dict().items()})
    fused, report = fuse_graph(onnx.load(str(tmp_path / "plain.onnx")), cfg, sig, params=params)
    assert report.attention == cfg.n_layer  # layers found by their weights, biases deduplicated or not
    save_graph(fused, tmp_path / "fused.onnx")
    want = {k: v.numpy() for k, v in model.state_dict().items()}
    for name in ("audit.onnx", "fused.onnx"):
        proto = onnx.load(str(tmp_path / name))
        refs = match_initializers(canonical_tensors(cfg, model.state_dict(), "fp32"), proto, tmp_path)
        assert set(refs) == set(want), name
        assert refs["h.1.ln_2.weight"].initializer == refs["h.0.ln_1.weight"].initializer  # one copy
        state = mapped_state_dict(proto, refs, str(tmp_path))
        for k, value in want.items():
            np.testing.assert_array_equal(state[k], value, err_msg=f"{name}: {k}")


def test_external_data_bundle_without_biases(tmp_path):
    """Weights in model.onnx.data are read per tensor; nanoGPT bias=False fuses without bias inputs."""
    ckpt = make_nanogpt_ckpt(tmp_path / "nano", bias=False, seed=3)
    bundle = export_bundle(ckpt, tmp_path / "b", attentions=False, external_data=True).bundle
    assert bundle.graph().data_file and bundle.manifest.parity["fp32"]["graph"]["fused"]
    for w, g in zip(_teacher_forced_logits(bundle, "torch"), _teacher_forced_logits(bundle, "ort")):
        assert float(np.abs(w - g).max()) <= TOLERANCES["fp32"]["logits"][0]


def _without_weights_map(bundle: Bundle, dst) -> Bundle:
    """The bundle as gptdeploy wrote it before the manifest recorded the weights map."""
    shutil.copytree(bundle.path, dst)
    data = json.loads((dst / MANIFEST).read_text())
    for g in data["graphs"].values():
        del g["weights"]
    (dst / MANIFEST).write_text(json.dumps(data))
    return Bundle.load(dst)


def test_older_bundles_fall_back_to_node_names_or_say_to_re_export(exported, tmp_path):
    old = _without_weights_map(exported("fp32-portable"), tmp_path / "audit")
    assert old.graph().weights is None
    for w, g in zip(_teacher_forced_logits(old, "torch"), _teacher_forced_logits(old, "ort")):
        assert float(np.abs(w - g).max()) <= TOLERANCES["fp32"]["logits"][0]
    old_fused = _without_weights_map(exported("fp32-fused"), tmp_path / "fused")
    with pytest.raises(BundleError, match="predates the manifest's weights map.*gptdeploy export SOURCE -o OUT"):
        open_runtime(old_fused, "torch")


def test_bad_weights_maps_are_clear_errors(exported, tmp_path):
    path = shutil.copytree(exported("fp32").path, tmp_path / "b")
    data = json.loads((path / MANIFEST).read_text())
    weights = data["graphs"]["fp32"]["weights"]
    weights["wte.weight"] = {"initializer": 7}
    (path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="field 'weights' must map parameter names.*bad: wte.weight"):
        Bundle.load(path)
    weights["wte.weight"] = {"initializer": "no-such-tensor", "transposed": False}
    (path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="no initializer no-such-tensor .* re-export it"):
        open_runtime(Bundle.load(path), "torch")
    del weights["wte.weight"]
    (path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="missing wte.weight.*weights map does not cover the model"):
        open_runtime(Bundle.load(path), "torch")


def test_a_weight_stored_in_another_float_dtype_maps_only_when_exact():
    """An fp16 parameter kept as an fp32 initializer (a folded Cast) maps, transposed or not; an fp32
    parameter that fp16 would round does not map to its fp16 rounding."""
    from onnx import helper, numpy_helper

    w16 = np.arange(6, dtype=np.float16).reshape(2, 3) / 7
    b32 = np.array([0.1, 0.2, 0.3], dtype=np.float32)  # not representable in fp16
    inits = [numpy_helper.from_array(w16.T.astype(np.float32), "w_t"), numpy_helper.from_array(b32.astype(np.float16), "b16")]
    proto = helper.make_model(helper.make_graph([], "g", [], [], initializer=inits))
    refs = match_initializers({"w": w16, "b": b32}, proto, ".")
    assert refs == {"w": refs["w"]} and (refs["w"].initializer, refs["w"].transposed) == ("w_t", True)
