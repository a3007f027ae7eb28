"""Export end to end: parity against the source framework, greedy vs transformers' generate,
bad input through the CLI (one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from gptdeploy import contract as io
from gptdeploy import parity
from gptdeploy.bundle import Bundle
from gptdeploy.cli import cli
from gptdeploy.errors import ExportError, ParityError
from gptdeploy.exporters.export import export_bundle
from tests.factories import make_hf_dir, make_hf_gpt2_dir, make_nanogpt_ckpt

HF_SHAPES = [
    dict(n_layer=2, n_head=1, n_embd=32),
    dict(n_layer=3, n_head=3, n_embd=36, vocab_size=301),  # odd head size 12, vocab not a multiple of 64
    dict(n_layer=4, n_head=4, n_embd=64, vocab_size=333, scale_attn_by_inverse_layer_idx=True),
    dict(n_layer=2, n_head=12, n_embd=48, layer_norm_epsilon=1e-6),
    dict(n_layer=2, n_head=2, n_embd=32, tie_word_embeddings=False),  # an untied GPT-2 head
]


def _assert_passed(report) -> None:
    assert report.passed, report.describe_failures()
    kinds = report.summary()
    assert set(kinds) == {"logits", "present", "attentions"}
    assert kinds["logits"]["max_abs_diff"] <= 1e-4
    assert kinds["attentions"]["max_abs_diff"] <= 1e-5
    assert report.batch >= 2 and len(set(report.prompt_lengths)) > 1  # left padding exercised
    assert report.greedy_steps == 32 and report.greedy_agree == 32
    phases = {c.phase for c in report.checks}
    assert "prefill" in phases and "decode 8" in phases


@pytest.mark.parametrize("shape", HF_SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_hf_gpt2_export_parity(tmp_path, shape):
    src = make_hf_gpt2_dir(tmp_path / "src", **shape)
    result = export_bundle(src, tmp_path / "bundle")
    _assert_passed(result.parity)
    m = result.bundle.manifest
    assert m.source["kind"] == "hf-gpt2" and "transformers" in result.parity.reference
    assert m.parity["fp32"]["passed"] is True
    assert set(m.files) == {"model.onnx", "tokenizer.json", "config.json", "generation_config.json",
                            "genai_config.json"}  # the last three: exporters/interop.py
    assert m.tools["onnxruntime"] and m.tools["torch"]
    n_rows = 8 * (1 + 2 * shape["n_layer"] + shape["n_layer"])  # prefill + 8 decodes, every output
    assert len(result.parity.checks) == n_rows + (1 + 3 * shape["n_layer"])


@pytest.mark.parametrize("bias,orig_mod", [(True, False), (False, True), (False, False)])
def test_nanogpt_export_parity(tmp_path, bias, orig_mod):
    ckpt = make_nanogpt_ckpt(tmp_path / "nano", bias=bias, orig_mod=orig_mod)
    result = export_bundle(ckpt, tmp_path / "bundle")
    _assert_passed(result.parity)
    assert "nanoGPT" in result.parity.reference
    assert result.bundle.config.bias is bias and result.bundle.config.gelu == "exact"


def test_greedy_tokens_equal_transformers_generate(tmp_path):
    """32 greedy tokens through the exported graph (KV cache) == transformers' own generate."""
    from transformers import GPT2LMHeadModel

    src = make_hf_gpt2_dir(tmp_path / "src", n_layer=3, n_head=4, n_embd=64, seed=3)
    bundle = export_bundle(src, tmp_path / "bundle").bundle
    sig = bundle.graph().signature
    sess = ort.InferenceSession(str(bundle.file("model.onnx")), providers=["CPUExecutionProvider"])
    hf = GPT2LMHeadModel.from_pretrained(src).eval()
    for prompt in ([5, 17, 42, 9], [101], list(range(60, 80))):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)
        want = want[0, len(prompt):].tolist()
        ids = np.array([prompt], np.int64)
        feeds = {n: np.zeros((1, sig.kv_heads, 0, sig.head_dim), np.float32) for n in sig.past_names()}
        got, mask = [], np.ones((1, len(prompt)), np.int64)
        for _ in range(32):
            pos = np.arange(mask.shape[1] - ids.shape[1], mask.shape[1], dtype=np.int64)[None]
            outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {
                io.INPUT_IDS: ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: pos, **feeds})))
            nxt = int(outs[io.LOGITS][0, -1].argmax())
            got.append(nxt)
            feeds = {p: outs[q] for p, q in zip(sig.past_names(), sig.present_names())}
            ids, mask = np.array([[nxt]], np.int64), np.ones((1, mask.shape[1] + 1), np.int64)
        assert got == want, prompt


def test_parity_failures_are_collected_and_nothing_is_written(tmp_path, monkeypatch):
    src = make_hf_gpt2_dir(tmp_path / "src")
    strict = {k: (0.0, why) for k, (_, why) in parity.TOLERANCES["fp32"].items()}
    monkeypatch.setitem(parity.TOLERANCES, "fp32", strict)
    with pytest.raises(ParityError) as err:
        export_bundle(src, tmp_path / "new" / "dirs" / "bundle")  # parents it made go again too
    report = err.value.report
    failing = {c.output.split(".")[0] for c in report.failures}
    assert {"logits", "present", "attentions"} <= failing  # every failing output, not the first
    assert "logits at prefill" in str(err.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]  # no bundle, no temporary directory


def test_missing_parent_directories_are_made(tmp_path):
    src = make_hf_gpt2_dir(tmp_path / "src")
    result = export_bundle(src, tmp_path / "out" / "nested" / "bundle")
    assert result.bundle.path == tmp_path / "out" / "nested" / "bundle"
    assert sorted(p.name for p in (tmp_path / "out" / "nested").iterdir()) == ["bundle"]


def test_existing_output_needs_force(tmp_path):
    src = make_hf_gpt2_dir(tmp_path / "src")
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not empty"):
        export_bundle(src, out)
    assert (out / "keep.txt").read_text() == "user data"
    export_bundle(src, out, force=True)
    assert not (out / "keep.txt").exists()
    Bundle.load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "src"]  # old copy cleaned up


def test_cli_export_and_verify(tmp_path):
    src = make_hf_gpt2_dir(tmp_path / "src")
    runner = CliRunner()
    r = runner.invoke(cli, ["export", str(src), "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "greedy tokens agree 32/32" in r.stdout and not r.stderr.strip()
    r = runner.invoke(cli, ["verify", str(tmp_path / "b"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["passed"] and report["parity"]["fp32"]["summary"]["logits"]["max_abs_diff"] < 1e-4
    r = runner.invoke(cli, ["verify", str(tmp_path / "b")])
    assert r.exit_code == 0 and "32/32 agree" in r.output


def _corrupt(path, how):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\x00garbage" * 64)


def _bad_case(tmp_path, case):
    """Build the bad input for `case`; returns (cli args, expected message fragment)."""
    out = str(tmp_path / "out")
    if case == "missing path":
        return ["export", str(tmp_path / "nope"), "-o", out], "does not exist"
    if case == "empty directory":
        (tmp_path / "empty").mkdir()
        return ["export", str(tmp_path / "empty"), "-o", out], "empty directory"
    if case == "unsupported architecture":
        d = tmp_path / "model"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
        return ["export", str(d), "-o", out], "architecture 'bert' (BertForMaskedLM) is not supported"
    if case in ("truncated safetensors", "corrupt safetensors"):
        d = make_hf_gpt2_dir(tmp_path / "src")
        _corrupt(d / "model.safetensors", "truncate" if case.startswith("truncated") else "garbage")
        return ["export", str(d), "-o", out], "model.safetensors"
    if case == "truncated ckpt.pt":
        ckpt = make_nanogpt_ckpt(tmp_path / "nano")
        _corrupt(ckpt, "truncate")
        return ["export", str(ckpt), "-o", out], "ckpt.pt"
    if case == "weights do not match config":
        d = make_hf_gpt2_dir(tmp_path / "src")
        cfg = json.loads((d / "config.json").read_text())
        cfg["n_embd"] = 48
        (d / "config.json").write_text(json.dumps(cfg))
        return ["export", str(d), "-o", out], "do not match"
    if case == "unsupported rope type":
        d = make_hf_dir(tmp_path / "src", "llama")
        cfg = json.loads((d / "config.json").read_text())
        cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0}
        (d / "config.json").write_text(json.dumps(cfg))
        return ["export", str(d), "-o", out], "rope_type 'yarn' is not supported; supported: default, linear, llama3"
    if case == "missing shard":
        d = make_hf_dir(tmp_path / "src", "qwen2", max_shard_size="20KB")
        shard = max(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())
        (d / shard).unlink()
        return ["export", str(d), "-o", out], "which is missing from"
    if case == "output not empty":
        d = make_hf_gpt2_dir(tmp_path / "src")
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "x").write_text("x")
        return ["export", str(d), "-o", out], "not empty"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing path", "empty directory", "unsupported architecture", "truncated safetensors",
    "corrupt safetensors", "truncated ckpt.pt", "weights do not match config", "output not empty",
    "unsupported rope type", "missing shard",
])
def test_cli_export_bad_input(tmp_path, case):
    args, fragment = _bad_case(tmp_path, case)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert fragment in lines[0]
    assert "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
