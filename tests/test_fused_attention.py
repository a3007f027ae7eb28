"""The one fused attention pass (exporters/gqa.py): every family's attention as GroupQueryAttention,
found through the weights, never by node names; rotary in the op (or RotaryEmbedding before it),
partial rotary, q/k norms, the sliding window, left padding; proven against transformers at export
and here against the unfused graph of the same model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from gptdeploy.exporters.export import export_bundle
from gptdeploy.exporters.fusion import fuse_graph
from gptdeploy.exporters.gqa import attention_params
from gptdeploy.exporters.graph_files import save_graph
from gptdeploy.exporters.onnx import export_onnx
from gptdeploy.exporters.sources import load_source
from gptdeploy.modeling import GPT, load_state
from gptdeploy.runtimes.session import SessionRuntime
from gptdeploy.steps import Steps
from tests.factories import make_hf_dir, make_hf_gpt2_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [42], [7, 7, 3, 250]]
# (family, config overrides, what the case exercises): head sizes of 16 or 32, so that the op takes
# the rotary itself (rotary_dim / 2 a multiple of 8); the factories' own shapes run it outside.
CASES = {
    "gpt2": ("gpt2", {}, "learned positions, biases, MHA as GQA 1:1"),
    "llama": ("llama", {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}, "GQA 2:1, rotary in the op"),
    "gpt_neox": ("gpt_neox", {"hidden_size": 64, "num_attention_heads": 2, "rotary_pct": 0.5}, "partial rotary in the op"),
    "qwen3": ("qwen3", {"head_dim": 16}, "q/k RMSNorms before the op"),
    "mistral": ("mistral", {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1, "sliding_window": 3},
                "MQA, sliding window (local_window_size)"),
    "qwen2": ("qwen2", {"hidden_size": 64, "num_attention_heads": 4, "use_sliding_window": True, "sliding_window": 3,
                        "max_window_layers": 1}, "the window in some layers only, qkv biases"),
}


def _source(tmp_path, name: str):
    family, overrides, _ = CASES[name]
    if family == "gpt2":
        return make_hf_gpt2_dir(tmp_path / "src", n_layer=2, n_head=4, n_embd=64, seed=1)
    return make_hf_dir(tmp_path / "src", family, seed=1, **overrides)


def _graphs(tmp_path, name: str, rename: bool = False):
    """(unfused path, fused path, signature, fusion report) of one case; `rename`: every node and
    intermediate tensor renamed first, so that nothing the tracer named can guide the pass."""
    source = load_source(_source(tmp_path, name))
    with torch.device("meta"):
        model = GPT(source.config)
    load_state(model, source.state)
    sig, _ = export_onnx(model.eval(), tmp_path / "plain.onnx", attentions=False, last_logits_only=True)
    proto = onnx.load(str(tmp_path / "plain.onnx"))
    if rename:
        _rename_everything(proto)
    params = attention_params({k: v.numpy() for k, v in model.state_dict().items()})
    fused, report = fuse_graph(proto, source.config, sig, params=params)
    save_graph(fused, tmp_path / "fused.onnx")
    return tmp_path / "plain.onnx", tmp_path / "fused.onnx", sig, report, source.config


def _rename_everything(proto: onnx.ModelProto) -> None:
    io_names = {v.name for v in [*proto.graph.input, *proto.graph.output]} | {t.name for t in proto.graph.initializer}
    renames: dict[str, str] = {}
    for j, node in enumerate(proto.graph.node):
        node.name = f"node{j}"
        for k, name in enumerate(node.output):
            if name not in io_names:
                renames[name] = node.output[k] = f"t{j}_{k}"
    for node in proto.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]


def _chain(path, sig, steps: int = 12) -> list[dict]:
    import onnxruntime as ort

    rt = SessionRuntime(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), sig)
    chain = Steps(rt, PROMPTS, pad_id=0, room=steps)
    out, outs = chain.prefill(), []
    for _ in range(steps):
        outs.append({k: v.copy() for k, v in out.outputs.items()} | {"mask": chain.mask.copy()})
        out = chain.decode(out.logits.argmax(-1))
    return outs


def _assert_same_on_real_positions(plain, fused, sig) -> None:
    for a, b in zip(_chain(plain, sig), _chain(fused, sig)):
        np.testing.assert_allclose(b["logits"], a["logits"], atol=1e-4, rtol=0)
        real = a["mask"].astype(bool)  # (B, S): pad positions hold arbitrary values, never read
        for name in sig.present_names():
            np.testing.assert_allclose(b[name].transpose(0, 2, 1, 3)[real], a[name].transpose(0, 2, 1, 3)[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", [n if n in ("gpt2", "llama") else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_every_family_fuses_into_one_op_per_layer(tmp_path, name):
    plain, fused, sig, report, config = _graphs(tmp_path, name)
    assert report.attention == config.n_layer, report.notes
    nodes = onnx.load(str(fused)).graph.node
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == config.n_layer and not any(n.op_type in ("Softmax", "RotaryEmbedding") for n in nodes)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in gqa]
    assert all(a["kv_num_heads"] == config.kv_heads and a["num_heads"] == config.n_head for a in attrs)
    assert all(a["do_rotary"] == (config.rope is not None) for a in attrs)
    windows = [a["local_window_size"] for a in attrs]
    assert windows == [config.sliding_window if config.windowed(i) else -1 for i in range(config.n_layer)]
    _assert_same_on_real_positions(plain, fused, sig)


def test_the_pass_finds_layers_by_their_weights_not_by_names(tmp_path):
    plain, fused, sig, report, config = _graphs(tmp_path, "qwen3", rename=True)
    assert report.attention == config.n_layer, report.notes
    _assert_same_on_real_positions(plain, fused, sig)


def test_rotary_widths_the_op_refuses_run_before_it_and_odd_head_sizes_stay_unfused(tmp_path):
    # The llama factory's head size 8 gives cos_cache a width of 4: RotaryEmbedding on q and k.
    src = make_hf_dir(tmp_path / "llama", "llama", seed=2)
    result = export_bundle(src, tmp_path / "b", attentions=False)
    info = result.bundle.manifest.parity["fp32"]["graph"]
    ops = [n.op_type for n in onnx.load(str(result.bundle.file("model.onnx"))).graph.node]
    assert info["fusion"]["GroupQueryAttention (gptdeploy pass)"] == 2 and ops.count("RotaryEmbedding") == 4
    assert result.parity.passed and info["fused"] is True  # against transformers, left padding included
    # Qwen3's factory head size 12: the CPU kernel needs multiples of 8; the report says so.
    src = make_hf_dir(tmp_path / "qwen3", "qwen3", seed=2)
    result = export_bundle(src, tmp_path / "q", attentions=False)
    fusion = result.bundle.manifest.parity["fp32"]["graph"]["fusion"]
    assert fusion["GroupQueryAttention (gptdeploy pass)"] == 0 and not result.bundle.graph().kv_shared_buffer
    assert any("head size 12" in note for note in fusion["notes"]) and result.parity.passed


def test_without_parameters_nothing_is_fused(tmp_path):
    cfg_src = load_source(_source(tmp_path, "gpt2"))
    with torch.device("meta"):
        model = GPT(cfg_src.config)
    load_state(model, cfg_src.state)
    sig, _ = export_onnx(model.eval(), tmp_path / "plain.onnx", attentions=False, last_logits_only=True)
    _, report = fuse_graph(onnx.load(str(tmp_path / "plain.onnx")), cfg_src.config, sig)
    assert report.attention == 0 and report.notes[0] == "attention not fused: no parameters to locate the layers by"


def test_biases_the_tracer_stored_once_are_still_found(tmp_path):
    """Random-init GPT-2 (samples/make_gpt2_124m.py) has all-zero biases: the tracer keeps one
    initializer and hands it to the other layers through Identity nodes."""
    from gptdeploy.config import GPTConfig

    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=300, block_size=64)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    sig, _ = export_onnx(model, tmp_path / "plain.onnx", attentions=False, last_logits_only=True)
    proto = onnx.load(str(tmp_path / "plain.onnx"))
    assert any(n.op_type == "Identity" for n in proto.graph.node)  # the case this test is about
    params = attention_params({k: v.numpy() for k, v in model.state_dict().items()})
    fused, report = fuse_graph(proto, cfg, sig, params=params)
    assert report.attention == cfg.n_layer, report.notes
    save_graph(fused, tmp_path / "fused.onnx")
    _assert_same_on_real_positions(tmp_path / "plain.onnx", tmp_path / "fused.onnx", sig)
