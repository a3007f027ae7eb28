"""Precision variants: fp16 (fp32 islands, checked on the CPU in fp16), int8 / int4 (agreement
with the fp32 graph, measured here again by an independent path), fused fast graphs, last-
position logits. Tiny seeded models always; the trained sample when it is present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from gptdeploy import Generator
from gptdeploy import contract as io
from gptdeploy.cli import cli
from gptdeploy.exporters.export import export_bundle
from gptdeploy.exporters.fp16 import Fp16CpuSession, precision_islands
from gptdeploy.parity import TOLERANCES
from gptdeploy.steps import left_pad, positions
from tests.factories import make_hf_gpt2_dir

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "tiny-gpt"
VAL = SAMPLE.parent / "corpus" / "val.txt"
PROMPTS = ["Once upon a time", "他喜欢吃", "The 3 dogs ran to the", "小红"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random HF GPT-2 and one bundle per variant, exported once for the module."""
    root = tmp_path_factory.mktemp("precision")
    src = make_hf_gpt2_dir(root / "src", n_layer=3, n_head=4, n_embd=64, seed=1)
    variants = {
        "fp32": {},
        "portable": {"portable": True},
        "fast": {"attentions": False},
        "fp16": {"precision": "fp16"},
        "int8": {"precision": "int8"},
        "int4-fast": {"precision": "int4", "attentions": False},
    }
    return src, {k: export_bundle(src, root / k, **kw) for k, kw in variants.items()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    variants = {"fp32": {}, "fast": {"attentions": False}, "fp16": {"precision": "fp16"},
                "int8": {"precision": "int8"}, "int4": {"precision": "int4"}}
    return {k: export_bundle(SAMPLE, root / k, **kw) for k, kw in variants.items()}


def _greedy(bundle_path, prompts, n=32) -> list[list[int]]:
    return [r.token_ids for r in _generate(bundle_path, prompts, n)]


def _generate(bundle_path, prompts, n=32):
    with Generator.load(bundle_path, backend="ort") as gen:
        return gen.generate(prompts, max_new_tokens=n)


# ------------------------------------------------------------------------------------------ fp16


def test_to_fp16_keeps_layernorm_parameters_exactly():
    """LayerNorm parameters stay the source's fp32 values, not fp32 values rounded through fp16."""
    from gptdeploy.config import GPTConfig
    from gptdeploy.modeling import GPT, to_fp16

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=16))
    with torch.no_grad():
        model.h[0].ln_1.weight.add_(1e-4 * torch.arange(16))  # steps finer than fp16's near 1.0
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "ln" in n}
    to_fp16(model)
    for name, p in model.named_parameters():
        if "ln" in name:
            assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
        else:
            assert p.dtype == torch.float16, name


def test_fp16_graph_is_fp16_with_fp32_islands_and_standard_ops(tiny):
    _, bundles = tiny
    b = bundles["fp16"].bundle
    entry = b.graph()
    assert entry.name == "fp16" and entry.precision == "fp16" and entry.signature.kv_dtype == "float16"
    manifest = json.loads((b.path / "gptdeploy.json").read_text())
    assert manifest["graphs"]["fp16"]["kv_dtype"] == "float16"
    proto = onnx.load(str(b.file(entry.file)))
    isl = precision_islands(proto)
    assert isl["non_standard"] == []  # TensorRT parses it: no com.microsoft ops
    assert set(isl["layernorm"]) == {"float32"} and len(isl["layernorm"]) == 2 * 3 + 1
    assert set(isl["softmax"]) == {"float32"} and len(isl["softmax"]) == 3
    assert isl["lm_head"] == ["float32"]
    assert set(isl["weight_matmul"]) == {"float16"}
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]}
    assert types[io.LOGITS] == onnx.TensorProto.FLOAT and types[io.attention(0)] == onnx.TensorProto.FLOAT
    assert types[io.present_key(0)] == types[io.past_value(2)] == onnx.TensorProto.FLOAT16
    V, C = b.config.vocab_size, b.config.n_embd
    big = [t for t in proto.graph.initializer if sorted(t.dims) == sorted([V, C])]
    assert [(t.name, t.data_type) for t in big] == [("wte.weight", onnx.TensorProto.FLOAT16)]  # tied: once


def test_fp16_parity_within_table_tolerance_on_the_cpu_fp16_path(tiny):
    _, bundles = tiny
    report = bundles["fp16"].parity
    assert report.passed, report.describe_failures()
    assert "ReferenceEvaluator" in report.runtime  # recorded which CPU path computed in fp16
    summary = report.summary()  # logits and K/V tolerances are relative to max |reference| (parity.RELATIVE)
    for kind in ("logits", "present", "attentions"):
        assert summary[kind]["max_abs_diff"] <= summary[kind]["tolerance"]
    assert summary["attentions"]["tolerance"] == TOLERANCES["fp16"]["attention"][0]
    assert summary["logits"]["max_abs_diff"] > 1e-5  # it really computed in fp16, not fp32
    recorded = bundles["fp16"].bundle.manifest.parity["fp16"]
    assert recorded["runtime"] == report.runtime and recorded["passed"]


def test_fp16_left_padding_gives_no_nan_or_inf(tiny):
    """Rows that are almost all padding (fully masked query rows) on the fp16 evaluator and on onnxruntime."""
    _, bundles = tiny
    b = bundles["fp16"].bundle
    sig, path = b.graph().signature, b.file(b.graph().file)
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11, 12], [42], [7, 7]], pad_id=0)
    feeds = {io.INPUT_IDS: ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: positions(mask)}
    feeds |= {n: np.zeros((3, sig.kv_heads, 0, sig.head_dim), np.float16) for n in sig.past_names()}
    for session in (Fp16CpuSession(path), ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])):
        outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        for name, value in outs.items():
            assert np.isfinite(value.astype(np.float32)).all(), name
        att = outs[io.attention(0)]  # (B, nh, T, S)
        assert np.allclose(att.sum(-1), 1.0, atol=1e-3)
        assert np.all(att[1, :, -1, :-1] == 0.0)  # the one real token never attends to padding


def test_fp16_sample_logits_within_tolerance_and_greedy_identical(sample):
    report = sample["fp16"].parity
    assert report.passed, report.describe_failures()
    logits = report.summary()["logits"]
    assert logits["max_abs_diff"] <= logits["tolerance"]
    assert report.greedy_agree == report.greedy_steps == 32  # identical, not merely near-ties
    assert report.greedy_mismatches == []


# ----------------------------------------------------------------------------------- int8 / int4


def _nll_reference(src_dir: Path, windows: np.ndarray, vocab: int) -> float:
    """Mean next-token NLL of transformers' own model on the windows (full sequences, no cache)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(src_dir).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(windows)).logits[:, :-1, :vocab].double()  # (W, L-1, V)
    lp = torch.log_softmax(logits, -1)
    return float(-lp.gather(-1, torch.from_numpy(windows[:, 1:, None])).mean())


def _nll_bundle(bundle, windows: np.ndarray, vocab: int) -> float:
    """Mean next-token NLL of a bundle's graph through the `ort` runtime (prefill, then decode)."""
    from gptdeploy.runtimes.backends import open_runtime

    W, L = windows.shape
    total = 0.0
    with open_runtime(bundle, "ort") as rt:
        out = rt.prefill(windows[:, :1], np.ones((W, 1), np.int64), np.zeros((W, 1), np.int64))
        for t in range(1, L):
            lg = out.logits[:, :vocab].astype(np.float64)  # (W, V)
            lp = lg - lg.max(-1, keepdims=True)
            lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
            total -= lp[np.arange(W), windows[:, t]].sum()
            if t < L - 1:
                out = rt.decode(windows[:, t : t + 1], np.ones((W, t + 1), np.int64), np.full((W, 1), t, np.int64))
    return total / (W * (L - 1))


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_sample_perplexity_and_greedy_within_bounds(sample, precision):
    """Recomputed here by another path (transformers for fp32, the ort runtime for the graph)."""
    result = sample[precision]
    report = result.parity
    assert report.passed, report.describe_failures()
    assert report.eval_text["kind"] == "held-out text" and report.eval_text["path"].endswith("val.txt")
    tok = result.bundle.manifest.tokenizer
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(result.bundle.file(tok.file)))
    stream = []
    for line in VAL.read_text(encoding="utf-8").splitlines()[:200]:
        stream += t.encode(line, add_special_tokens=False).ids + [tok.eos_token_id]
    windows = np.array([stream[i * 128 : (i + 1) * 128] for i in range(8)], np.int64)  # 8 x 128 tokens
    ppl_ref = np.exp(_nll_reference(SAMPLE, windows, tok.vocab_size))
    ppl_q = np.exp(_nll_bundle(result.bundle, windows, tok.vocab_size))
    bound = TOLERANCES[precision]["perplexity"][0]
    assert ppl_q / ppl_ref - 1 <= bound, (ppl_q, ppl_ref)
    assert abs(report.perplexity_fp32 / report.perplexity - ppl_ref / ppl_q) < 0.05  # same story both ways
    # Greedy through the Generator, fp32 bundle vs quantized bundle, prompt by prompt; at each
    # first divergence the fp32 graph's own log-probabilities say how close the call was.
    fp32_bundle = sample["fp32"].bundle
    fp32 = _generate(fp32_bundle.path, PROMPTS)
    quant = _greedy(result.bundle.path, PROMPTS)
    margins = []
    for r, b in zip(fp32, quant):
        a = r.token_ids
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if d is not None:
            ids = np.array([r.prompt_token_ids + a[:d]], np.int64)
            lp = _last_log_probs(fp32_bundle, ids, tok.vocab_size)
            margins.append(lp[a[d]] - lp[b[d]])
    bound = TOLERANCES[precision]["margin"][0]
    assert max(margins, default=0.0) <= bound, margins
    assert max(report.divergence_margins, default=0.0) <= bound
    assert report.top1_margins.get("p99", 0.0) <= bound


def _last_log_probs(bundle, ids: np.ndarray, vocab: int) -> np.ndarray:
    from gptdeploy.runtimes.backends import open_runtime

    with open_runtime(bundle, "ort") as rt:
        out = rt.prefill(ids, np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None])
    lg = out.logits[0, :vocab].astype(np.float64)
    return lg - lg.max() - np.log(np.exp(lg - lg.max()).sum())


def test_quantized_sample_sizes_and_float_tensors(sample):
    fp32 = sum(p.stat().st_size for p in sample["fp32"].bundle.path.iterdir())
    for precision, target in (("int8", 0.6), ("int4", 0.45)):
        b = sample[precision].bundle
        size = sum(p.stat().st_size for p in b.path.iterdir())
        assert size <= target * fp32, (precision, size / fp32)
        graph = b.manifest.parity[precision]["graph"]
        floats = graph["quantization"]["float_tensors"]
        assert floats["wte.weight"].startswith("float16") and "lm_head.weight" not in floats
        assert graph["quantization"]["quantized_tensors"] == 4 * 4 + 1  # every Linear + the lm_head copy


def test_quantized_tiny_bundles_record_their_measures(tiny):
    _, bundles = tiny
    for name in ("int8", "int4-fast"):
        result = bundles[name]
        precision = result.bundle.graph().precision
        rec = result.bundle.manifest.parity[precision]
        assert rec["passed"] and {m["name"] for m in rec["measures"]} == {
            "perplexity increase", "greedy divergence margin (nats)", "top-1 disagreement margin p99 (nats)"}
        assert 0 < rec["top1_agreement"] <= 1
        assert rec["eval_text"]["scored_tokens"] > 0 and rec["graph"]["size"]["ratio"] < 0.6
        assert rec["graph"]["fp32_parity"]["passed"]
    assert bundles["int4-fast"].bundle.manifest.parity["int4"]["graph"]["fused"] is True


def test_quantized_out_of_bounds_fails_and_writes_nothing(tmp_path, monkeypatch):
    src = make_hf_gpt2_dir(tmp_path / "src")
    strict = dict(TOLERANCES["int8"], perplexity=(-1.0, "test: impossible bound"))
    monkeypatch.setitem(TOLERANCES, "int8", strict)
    r = CliRunner().invoke(cli, ["export", str(src), "-o", str(tmp_path / "b"), "--int8"])
    assert r.exit_code == 2, r.output
    assert "perplexity increase" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no bundle, no temporary directory


# ---------------------------------------------------------------------------- fused, last logits


def test_fused_graph_has_fused_ops_and_same_greedy_tokens(tiny, tmp_path):
    _, bundles = tiny
    fast = bundles["fast"].bundle
    info = fast.manifest.parity["fp32"]["graph"]
    assert info["fused"] is True and info["fusion"]["GroupQueryAttention (gptdeploy pass)"] == 3
    assert fast.graph().kv_shared_buffer and bundles["int4-fast"].bundle.graph().kv_shared_buffer
    assert not bundles["portable"].bundle.graph().kv_shared_buffer  # unfused: present = past + new, by Concat
    proto = onnx.load(str(fast.file("model.onnx")))
    ops = {n.op_type for n in proto.graph.node}
    assert {"GroupQueryAttention", "FastGelu", "LayerNormalization"} <= ops and "Softmax" not in ops
    assert "SkipLayerNormalization" not in ops  # slower than Add + LayerNormalization (ort_fusions.py)
    so = ort.SessionOptions()  # ... and onnxruntime does not fuse them again when it loads the graph
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    ort.InferenceSession(str(fast.file("model.onnx")), so, providers=["CPUExecutionProvider"])
    loaded = {n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node}
    assert "LayerNormalization" in loaded and "SkipLayerNormalization" not in loaded
    kinds = [n.op_type for n in proto.graph.node]
    assert kinds.count("MatMul") == 4 * 3 and kinds.count("Gemm") == 1  # Linears pre-packed; the tied head
    overridable = {v.name for v in proto.graph.input} & {t.name for t in proto.graph.initializer}
    assert overridable == {"wte.weight"}  # the head reads the embedding unpacked (graph_files.expose_gemv_weights)
    assert bundles["fast"].parity.passed  # the fused graph itself passed parity against transformers
    prompts = ["The quick brown fox", "你好", "A deploy bundle carries"]
    assert _greedy(fast.path, prompts) == _greedy(bundles["portable"].bundle.path, prompts)


def test_default_fp32_audit_graph_is_fused_and_records_what_the_portable_graph_records(tiny):
    """The default fp32 graph is fused for onnxruntime and still an audit graph: GroupQueryAttention's
    softmax output (qk_output=2) gives the attention rows. `--portable` keeps standard ONNX ops; both
    record the same attention and pick the same tokens."""
    _, bundles = tiny
    audit, portable = bundles["fp32"].bundle, bundles["portable"].bundle
    assert audit.manifest.parity["fp32"]["graph"]["fused"] is True and audit.graph().kv_shared_buffer
    assert audit.graph().signature.attentions and portable.graph().signature.attentions
    assert portable.manifest.parity["fp32"]["graph"]["fused"] is False
    ops = {n.op_type: n for n in onnx.load(str(audit.file("model.onnx"))).graph.node}
    assert {"GroupQueryAttention", "LayerNormalization", "FastGelu"} <= set(ops) and "Softmax" not in ops
    assert "SkipLayerNormalization" not in ops
    assert {a.name: a.i for a in ops["GroupQueryAttention"].attribute}["qk_output"] == 2
    fusion = audit.manifest.parity["fp32"]["graph"]["fusion"]  # the same norm and GELU fusions as without outputs
    assert fusion["onnxruntime optimizer"] == bundles["fast"].bundle.manifest.parity["fp32"]["graph"]["fusion"]["onnxruntime optimizer"]
    portable_ops = onnx.load(str(portable.file("model.onnx"))).graph.node
    assert {n.domain for n in portable_ops} <= {"", "ai.onnx"} and "Softmax" in {n.op_type for n in portable_ops}
    prompts = ["The quick brown fox", "你好", "A deploy bundle carries"]
    runs = []
    for b in (audit, portable):
        with Generator.load(b.path, backend="ort") as gen:
            runs.append(gen.generate(prompts, max_new_tokens=12, record_attention=True))
    for fused, standard in zip(*runs):
        assert fused.token_ids == standard.token_ids
        assert len(fused.attention) == len(standard.attention) == audit.config.n_layer
        for a, b in zip(fused.attention, standard.attention):  # per layer (1, nh, S, S): softmax rows in fp32
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_portable_is_for_fp32_and_build_engine_refuses_cpu_graphs(tiny, tmp_path):
    """--portable with a quantized precision is a one-line error and writes nothing; build-engine
    names --portable / --fp16 for a fused or quantized graph before it looks for TensorRT."""
    src, bundles = tiny
    r = CliRunner().invoke(cli, ["export", str(src), "-o", str(tmp_path / "q"), "--int8", "--portable"])
    assert r.exit_code == 2 and not (tmp_path / "q").exists()
    assert r.stderr.strip().splitlines()[-1].startswith("error: --portable keeps an fp32 graph standard ONNX")
    for kind, what in (("fp32", "is fused"), ("int8", "is quantized to int8")):
        r = CliRunner().invoke(cli, ["build-engine", str(bundles[kind].bundle.path)])
        assert r.exit_code == 2, r.output
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith("error: graph") and what in line and "--portable" in line and "--fp16" in line


def test_cuda_provider_refuses_cpu_graphs_and_auto_goes_on_to_ort(tiny, monkeypatch):
    """On a GPU machine, a fused or quantized graph is not handed to onnxruntime's CUDA provider
    (its com.microsoft ops would run on the CPU, activations copied across every layer): an explicit
    ort-cuda says what to do, `auto` takes the `ort` runtime; a portable graph is accepted."""
    from gptdeploy.errors import BackendUnavailable
    from gptdeploy.runtimes import backends, ort_cuda

    _, bundles = tiny
    monkeypatch.setattr(ort_cuda, "missing", lambda: None)  # as if onnxruntime had its CUDA provider
    monkeypatch.setattr(backends, "_auto_candidates", lambda: ["ort-cuda", "ort"])
    for kind, what in (("fp32", "is fused"), ("int8", "is quantized to int8")):
        b = bundles[kind].bundle
        with pytest.raises(BackendUnavailable, match=f"graph '{b.graph().name}' {what} .*--backend ort.*--portable"):
            ort_cuda.OrtCudaRuntime(b, b.graph())
        with backends.open_runtime(b, "auto", threads=1) as rt:
            assert rt.name == "ort"
    def no_gpu(*args):  # where a portable graph goes next: the session on the GPU
        raise BackendUnavailable("no GPU here")

    monkeypatch.setattr(ort_cuda, "_open_session", no_gpu)
    with pytest.raises(BackendUnavailable, match="no GPU here"):  # got past the graph check
        ort_cuda.OrtCudaRuntime(bundles["portable"].bundle, bundles["portable"].bundle.graph())


def test_fused_sample_same_greedy_tokens_as_audit_graph(sample):
    assert sample["fast"].bundle.manifest.parity["fp32"]["graph"]["fused"] is True
    assert _greedy(sample["fast"].bundle.path, PROMPTS) == _greedy(sample["fp32"].bundle.path, PROMPTS)


def test_last_logits_graph_gives_the_same_next_tokens(tiny, tmp_path):
    """The default graph computes logits at the last position only; `--all-logits` at every one."""
    src, bundles = tiny
    last = bundles["fp32"].bundle
    assert last.graph().signature.last_logits_only
    full = export_bundle(src, tmp_path / "all", last_logits_only=False).bundle
    assert not full.graph().signature.last_logits_only
    ids, mask = left_pad([[3, 4, 5, 6, 7, 8], [9, 10]], pad_id=0)
    outs = []
    for b in (last, full):
        sig = b.graph().signature
        sess = ort.InferenceSession(str(b.file("model.onnx")), providers=["CPUExecutionProvider"])
        feeds = {io.INPUT_IDS: ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: positions(mask)}
        feeds |= {n: np.zeros((2, sig.kv_heads, 0, sig.head_dim), np.float32) for n in sig.past_names()}
        outs.append(sess.run([io.LOGITS], feeds)[0])
    assert outs[0].shape == (2, 1, last.config.vocab_size) and outs[1].shape == (2, 6, last.config.vocab_size)
    np.testing.assert_allclose(outs[0][:, 0], outs[1][:, -1], atol=1e-5, rtol=0)
    prompts = ["The quick brown fox", "你好"]
    assert _greedy(last.path, prompts) == _greedy(full.path, prompts)
    assert full.manifest.parity["fp32"]["passed"]  # every position compared against transformers


# ------------------------------------------------------------------------------ every variant runs


def test_every_variant_generates_through_generator_and_cli(tiny):
    _, bundles = tiny
    runner = CliRunner()
    for name, result in bundles.items():
        with Generator.load(result.bundle.path) as gen:
            out = gen.generate(["你好", "The quick"], max_new_tokens=8)
            assert all(r.token_ids for r in out), name
        r = runner.invoke(cli, ["generate", str(result.bundle.path), "The quick", "--max-new-tokens", "6", "--json"])
        assert r.exit_code == 0, (name, r.output)
        assert json.loads(r.stdout)["graph"] == result.bundle.graph().name


def test_precision_flags_are_mutually_exclusive(tmp_path):
    r = CliRunner().invoke(cli, ["export", str(tmp_path), "-o", str(tmp_path / "b"), "--fp16", "--int8"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "mutually exclusive" in lines[0]
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------ verify: TensorRT parse


def test_verify_checks_tensorrt_parsing_of_standard_op_graphs_only(tiny):
    """fp32 and fp16 graphs are build-engine inputs: verify runs the operator-table check on them.
    Fused and quantized graphs carry onnxruntime contrib ops and are reported as not checked."""
    from gptdeploy.exporters.verify import verify_bundle

    _, bundles = tiny
    found = {k: verify_bundle(r.bundle.path, integrity_only=True).tensorrt for k, r in bundles.items()}
    assert found == {"fp32": {"fp32": None}, "portable": {"fp32": []}, "fp16": {"fp16": []}, "fast": {"fp32": None},
                     "int8": {"int8": None}, "int4-fast": {"int4": None}}
    r = CliRunner().invoke(cli, ["verify", str(bundles["fp16"].bundle.path), "--integrity-only"])
    assert r.exit_code == 0 and "fp16 graph, TensorRT 10.15 parser check: ok" in r.output
    r = CliRunner().invoke(cli, ["verify", str(bundles["fast"].bundle.path), "--integrity-only", "--json"])
    assert json.loads(r.stdout)["tensorrt_parser_check"] == {"fp32": None}


def test_verify_fails_on_what_tensorrt_would_reject(tiny, monkeypatch):
    from gptdeploy.exporters.tensorrt import checks

    _, bundles = tiny
    monkeypatch.setattr(checks, "check_trt_operators", lambda path: ["op Foo is not in the table (1 node, first n)"])
    r = CliRunner().invoke(cli, ["verify", str(bundles["fp16"].bundle.path), "--integrity-only"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: verification failed: fp16: TensorRT would reject it")
