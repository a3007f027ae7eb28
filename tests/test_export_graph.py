"""The exported graph itself: IO contract, every axis size that matters, tied weights, external data."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gptdeploy import contract as io
from gptdeploy.config import GPTConfig, Rope
from gptdeploy.exporters.graph_files import ALIGN, INLINE_MAX_BYTES, expose_gemv_weights, graph_inputs
from gptdeploy.exporters.onnx import export_onnx, graph_io_problems
from gptdeploy.exporters.quantize import untie_lm_head
from gptdeploy.modeling import GPT
from gptdeploy.steps import positions

# The traced graph and torch run the same fp32 math in a different GEMM order: ~3e-7
# relative, so 1e-4 absolute on logits of magnitude up to ~40, 1e-5 on K/V and probabilities.
TOL = 1e-5
LOGITS_TOL = 1e-4


def _model(seed=0, **kw) -> GPT:
    cfg = GPTConfig(**{"n_layer": 2, "n_head": 3, "n_embd": 48, "vocab_size": 97, "block_size": 64, **kw})
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm / bias values so that mistakes show
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model()
    path = tmp_path_factory.mktemp("graph") / "model.onnx"
    sig, data = export_onnx(model, path)
    return model, path, sig, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_both(model, sess, sig, B, P, T, pad_first=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, P + T, dtype=torch.int64)
    mask[0, :pad_first] = 0
    pos = torch.from_numpy(positions(mask.numpy())[:, P:])
    shape = (B, sig.kv_heads, P, sig.head_dim)
    past_flat = [torch.randn(shape, generator=g) for _ in sig.past_names()]
    past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(sig.n_layer)]
    feeds = {io.INPUT_IDS: ids.numpy(), io.ATTENTION_MASK: mask.numpy(), io.POSITION_IDS: pos.numpy()}
    feeds |= {n: t.numpy() for n, t in zip(sig.past_names(), past_flat)}
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    with torch.no_grad():
        logits, presents, atts = model(ids, mask, pos, past)
    return outs, logits, presents, atts


@pytest.mark.parametrize(
    "B,P,T",
    [(1, 0, 1), (1, 0, 2), (3, 0, 7), (1, 1, 1), (2, 5, 1), (1, 9, 3), (4, 30, 1)],
    ids=lambda v: str(v),
)
def test_graph_matches_module_at_edge_sizes(exported, B, P, T):
    """Traced with sizes >= 2; must run at empty past, one token, batch 1 (the sizes torch.export specializes)."""
    model, _, sig, sess = exported
    outs, logits, presents, atts = _run_both(model, sess, sig, B, P, T)
    assert outs[io.LOGITS].shape == (B, T, model.config.vocab_size)
    np.testing.assert_allclose(outs[io.LOGITS], logits.numpy(), atol=LOGITS_TOL, rtol=0)
    for i, (k, v) in enumerate(presents):
        assert outs[io.present_key(i)].shape == (B, sig.kv_heads, P + T, sig.head_dim)
        np.testing.assert_allclose(outs[io.present_key(i)], k.numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(outs[io.present_value(i)], v.numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(outs[io.attention(i)], atts[i].numpy(), atol=TOL, rtol=0)


def test_left_padding_has_no_nan_and_masks_padding(exported):
    model, _, sig, sess = exported
    outs, *_ = _run_both(model, sess, sig, B=2, P=0, T=6, pad_first=3)
    for name in [io.LOGITS, *sig.attention_names()]:
        assert np.isfinite(outs[name]).all(), name
    att = outs[io.attention(0)]  # (B, nh, T, S)
    assert np.all(att[0, :, 3:, :3] == 0.0)  # real queries never attend to padding
    assert np.allclose(att.sum(-1), 1.0, atol=1e-6)
    assert np.all(np.triu(att[1], k=1) == 0.0)  # causal


def test_io_matches_contract_and_checker_passes(exported):
    _, path, sig, _ = exported
    assert graph_io_problems(path, sig) == []
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert "Softmax" in ops and "MatMul" in ops
    assert not {n.domain for n in proto.graph.node} - {"", "ai.onnx"}, "no contrib ops"
    assert proto.opset_import[0].version == 17


def test_tied_embedding_stored_once(tmp_path):
    model = _model(vocab_size=4001)  # embedding dominates, so a second copy would show in the size
    path = tmp_path / "model.onnx"
    export_onnx(model, path)
    proto = onnx.load(str(path))
    V, C = model.wte.weight.shape
    big = [t.name for t in proto.graph.initializer if sorted(t.dims) == sorted([V, C])]
    assert big == ["wte.weight"]
    weights = sum(p.numel() for p in model.parameters()) * 4
    assert path.stat().st_size < weights + V * C * 4 // 4  # far less than a second copy
    gemm = [n for n in proto.graph.node if n.op_type == "Gemm"]
    assert len(gemm) == 1 and gemm[0].input[1] == "wte.weight" and gemm[0].attribute[0].i == 1


def test_weights_named_by_module_path(exported):
    _, path, _, _ = exported
    names = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert "h.1.mlp.c_fc.weight" in names and "h.0.attn.c_attn.weight" in names
    assert not [n for n in names if n.startswith("onnx::")]


def test_attentions_can_be_left_out(tmp_path):
    model = _model()
    sig, _ = export_onnx(model, tmp_path / "m.onnx", attentions=False)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert names == [io.LOGITS, *sig.present_names()]
    outs, logits, _, _ = _run_both(model, sess, sig, B=2, P=2, T=3)
    np.testing.assert_allclose(outs[io.LOGITS], logits.numpy(), atol=LOGITS_TOL, rtol=0)


def test_forced_external_data_round_trips(tmp_path):
    """Weights in model.onnx.data (the default from EXTERNAL_MIN_BYTES, forced on a small model):
    every tensor of INLINE_MAX_BYTES or more is external, each of ALIGN bytes or more starts at an
    ALIGN multiple (memory-mappable), and the graph still computes what torch computes."""
    model = _model(n_layer=1, n_embd=128, n_head=4, vocab_size=301)  # wte 154 KB, c_fc 262 KB: > ALIGN
    sig, data = export_onnx(model, tmp_path / "model.onnx", external_data=True)
    assert data == "model.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["model.onnx.data"] == modes["model.onnx"]  # the user's umask, not onnx's 0600
    proto = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    external = {}
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == "model.onnx.data"
            external[t.name] = (int(info["offset"]), int(info["length"]))
        else:
            assert len(t.raw_data) < INLINE_MAX_BYTES, t.name
    big = {n: off for n, (off, length) in external.items() if length >= ALIGN}
    assert {"wte.weight", "h.0.mlp.c_fc.weight", "h.0.attn.c_attn.weight"} <= set(big)
    assert all(off % ALIGN == 0 for off in big.values()), big
    spans = sorted(external.values())
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])), "tensors overlap"
    assert (tmp_path / "model.onnx.data").stat().st_size == spans[-1][0] + spans[-1][1]
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    outs, logits, _, _ = _run_both(model, sess, sig, B=1, P=0, T=4)
    np.testing.assert_allclose(outs[io.LOGITS], logits.numpy(), atol=LOGITS_TOL, rtol=0)


def test_small_graphs_stay_in_one_file(tmp_path):
    _, data = export_onnx(_model(n_layer=1), tmp_path / "model.onnx")
    assert data is None and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_tied_embedding_is_an_overridable_input_not_a_runtime_input(exported):
    """wte is listed as a graph input (so onnxruntime does not pre-pack a second copy of it for
    the lm_head), which must not leak into the contract: onnxruntime's runtime inputs, the IO
    check and TensorRT's parser all leave initializer-backed inputs out."""
    _, path, sig, sess = exported
    proto = onnx.load(str(path), load_external_data=False)
    assert [v.name for v in proto.graph.input if v.name == "wte.weight"] == ["wte.weight"]
    assert [v.name for v in graph_inputs(proto)] == [s.name for s in sig.inputs()]
    assert [i.name for i in sess.get_inputs()] == [s.name for s in sig.inputs()]
    assert [i.name for i in sess.get_overridable_initializers()] == ["wte.weight"]


def test_expose_gemv_weights_is_idempotent_and_drops_an_untied_listing(exported):
    _, path, _, _ = exported
    proto = onnx.load(str(path))
    before = [v.name for v in proto.graph.input]
    expose_gemv_weights(proto)
    assert [v.name for v in proto.graph.input] == before
    untie_lm_head(proto)  # the lm_head gets its own matrix; wte is only gathered now
    expose_gemv_weights(proto)
    assert "wte.weight" not in [v.name for v in proto.graph.input]


def test_grouped_query_attention_exports(tmp_path):
    model = _model(n_head=4, n_kv_head=2, n_embd=32)
    sig, _ = export_onnx(model, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    outs, logits, presents, _ = _run_both(model, sess, sig, B=2, P=3, T=2)
    assert outs[io.present_key(0)].shape[1] == 2
    np.testing.assert_allclose(outs[io.LOGITS], logits.numpy(), atol=LOGITS_TOL, rtol=0)


# The other families' switches, straight on GPTConfig: the traced graph must follow the module at
# every axis size, with windows shorter than the cache and an untied head.
FAMILY_SWITCHES = {
    "llama-gqa-llama3-untied": dict(
        n_head=6, n_kv_head=2, norm="rmsnorm", mlp="swiglu", n_inner=40, bias=False, tie_word_embeddings=False,
        rope=Rope(theta=500.0, scaling="llama3", factor=4.0, original_max_positions=16)),
    "qwen3-window-qk-norm-head-size": dict(
        n_head=4, n_kv_head=1, head_size=20, norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True,
        rope=Rope(scaling="linear", factor=2.0), qk_norm=True, sliding_window=3, window_layers=(1,)),
    "neox-partial-parallel": dict(
        rope=Rope(dim=6), parallel_residual=True, gelu="exact", tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=FAMILY_SWITCHES, ids=FAMILY_SWITCHES)
def family_graph(request, tmp_path_factory):
    model = _model(**FAMILY_SWITCHES[request.param])
    path = tmp_path_factory.mktemp("family") / "model.onnx"
    sig, _ = export_onnx(model, path)
    return model, path, sig, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("B,P,T,pad", [(1, 0, 1, 0), (3, 0, 7, 2), (2, 5, 1, 3), (1, 9, 3, 0), (2, 30, 1, 4)])
def test_family_graphs_match_module_at_edge_sizes(family_graph, B, P, T, pad):
    model, _, sig, sess = family_graph
    outs, logits, presents, atts = _run_both(model, sess, sig, B, P, T, pad_first=pad)
    np.testing.assert_allclose(outs[io.LOGITS], logits.numpy(), atol=LOGITS_TOL, rtol=0)
    for i, (k, v) in enumerate(presents):
        assert outs[io.present_key(i)].shape == (B, sig.kv_heads, P + T, sig.head_dim)
        np.testing.assert_allclose(outs[io.present_key(i)], k.numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(outs[io.present_value(i)], v.numpy(), atol=TOL, rtol=0)
        assert outs[io.attention(i)].shape == (B, model.config.n_head, T, P + T)  # per query head
        np.testing.assert_allclose(outs[io.attention(i)], atts[i].numpy(), atol=TOL, rtol=0)


def test_untied_head_is_stored_once_as_a_gemm(family_graph):
    model, path, _, _ = family_graph
    proto = onnx.load(str(path))
    V, C = model.config.vocab_size, model.config.n_embd
    big = sorted(t.name for t in proto.graph.initializer if sorted(t.dims) == sorted([V, C]))
    head = "wte.weight" if model.config.tie_word_embeddings else "lm_head.weight"
    assert big == sorted({"wte.weight", head})  # no folded (C, V) transpose beside it
    gemm = [n for n in proto.graph.node if n.op_type == "Gemm"]
    assert len(gemm) == 1 and gemm[0].input[1] == head and gemm[0].attribute[0].i == 1
