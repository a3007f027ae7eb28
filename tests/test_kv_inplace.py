"""The `ort` runtime's shared-buffer KV cache: a fused graph's GroupQueryAttention writes the new
positions into one preallocated buffer bound as both past and present. It must give the copying
path's logits bit for bit (prefill + 40 decode steps, left-padded batch, with and without the
buffers growing), keep take_cache / put_cache exact for the batching engine, and the engine must
return the same tokens for a request alone and among others."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from gptdeploy.bundle import Bundle
from gptdeploy.engine import Engine, EngineLimits
from gptdeploy.errors import BundleError
from gptdeploy.exporters.export import export_bundle
from gptdeploy.manifest import MANIFEST, GraphEntry
from gptdeploy.runtimes import kv_buffer
from gptdeploy.runtimes.ort import OrtRuntime
from gptdeploy.steps import Steps
from tests.factories import make_hf_dir, make_hf_gpt2_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [42], [7, 7, 3, 250]]  # left padding: 0, 6 and 3 positions
STEPS = 40


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """Fused bundles: GPT-2 (12 heads' worth of MHA as GQA 1:1) and Llama (GQA 2:1, rotary in the op)."""
    root = tmp_path_factory.mktemp("kv-inplace")
    gpt2 = make_hf_gpt2_dir(root / "gpt2-src", n_layer=3, n_head=4, n_embd=64, n_positions=256, seed=1)
    llama = make_hf_dir(root / "llama-src", "llama", seed=1, hidden_size=64, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256)
    made = {name: export_bundle(src, root / name, attentions=False).bundle for name, src in
            (("gpt2", gpt2), ("llama", llama))}
    made["llama-int8-audit"] = export_bundle(llama, root / "int8", precision="int8").bundle  # fused, attentions from the op
    made["llama-int4-kv8"] = export_bundle(llama, root / "int4-kv8", precision="int4", attentions=False,
                                           kv_cache="int8").bundle
    return made


def _chain(bundle: Bundle, shared: bool, prompts=PROMPTS, steps=STEPS, record=False):
    """Logits of a greedy chain (prefill + `steps` decodes), stacked, the final cache, and (record)
    every step's attention rows."""
    entry = bundle.graph() if shared else dataclasses.replace(bundle.graph(), kv_shared_buffer=False)
    with OrtRuntime(bundle, entry, threads=1) as rt:
        assert rt.shares_kv_buffer is shared
        chain = Steps(rt, prompts, pad_id=0, room=steps)
        out = chain.prefill(record)
        logits, attentions = [out.logits], [out.attentions]
        for _ in range(steps):
            out = chain.decode(out.logits.argmax(-1), record)
            logits.append(out.logits)
            attentions.append(out.attentions)
        return np.stack(logits), rt.take_cache(), attentions


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama-int4-kv8"])
@pytest.mark.parametrize("tight", [False, True], ids=["capacity-with-room", "growing-every-step"])
def test_shared_buffer_gives_the_copying_paths_logits_bit_for_bit(fused, family, tight, monkeypatch):
    bundle = fused[family]
    assert bundle.graph().kv_shared_buffer
    want, want_cache, _ = _chain(bundle, shared=False)
    if tight:  # no spare room: the buffers are reallocated and copied at every step
        monkeypatch.setattr(kv_buffer, "capacity_for", lambda need, limit: need)
    got, got_cache, _ = _chain(bundle, shared=True)
    assert np.array_equal(got, want)
    assert len(got_cache) == len(want_cache) and all(np.array_equal(g, w) for g, w in zip(got_cache, want_cache))
    assert got_cache[0].shape == (3, bundle.config.kv_heads, 7 + STEPS, bundle.config.head_dim)


def test_put_cache_continues_exactly_and_buffers_have_room(fused):
    """take_cache -> reset -> put_cache -> decode gives what the uninterrupted chain gives."""
    bundle = fused["llama"]
    want, _, _ = _chain(bundle, shared=True, steps=12)
    with OrtRuntime(bundle, bundle.graph(), threads=1) as rt:
        chain = Steps(rt, PROMPTS, pad_id=0, room=12)
        out = chain.prefill()
        got = [out.logits]
        for step in range(12):
            if step == 5:
                cache, length = rt.take_cache(), rt.past_length
                rt.reset()
                rt.put_cache(cache)
                assert rt.past_length == length and rt._buffers.capacity > length  # room to decode
            out = chain.decode(out.logits.argmax(-1))
            got.append(out.logits)
    assert np.array_equal(np.stack(got), want)


def test_an_audit_graph_records_the_same_attention_in_both_modes(fused):
    bundle = fused["llama-int8-audit"]
    assert bundle.graph().kv_shared_buffer and bundle.graph().signature.attentions
    want, _, want_att = _chain(bundle, shared=False, steps=10, record=True)
    got, _, got_att = _chain(bundle, shared=True, steps=10, record=True)
    assert np.array_equal(got, want)
    for step, (g, w) in enumerate(zip(got_att, want_att)):
        assert all(np.array_equal(a, b) for a, b in zip(g, w)), step
    assert got_att[-1][0].shape == (3, bundle.config.n_head, 1, 7 + 10)  # (B, nh, T, S): the contract's
    quiet, _, _ = _chain(bundle, shared=True, steps=10)  # not recording: one scratch buffer, same logits
    assert np.array_equal(quiet, want)


def test_capacity_policy():
    assert kv_buffer.capacity_for(7, 1024) == 128  # 7 + 64, rounded to 64
    assert kv_buffer.capacity_for(512, 1024) == 768  # half as much again
    assert kv_buffer.capacity_for(900, 1024) == 1024  # never past the model's context
    assert kv_buffer.capacity_for(1100, 1024) == 1100  # ... unless asked for more


def test_engine_gives_each_request_its_tokens_alone_and_batched(fused):
    prompts = ["The quick brown fox", "你好，世界。我们一起学习", "A", "Numbers 0123 and (brackets)"]
    options = [{"max_new_tokens": 30}, {"max_new_tokens": 20, "temperature": 1.0, "seed": 11},
               {"max_new_tokens": 9}, {"max_new_tokens": 25, "temperature": 0.8, "top_k": 20, "seed": 5}]
    sizes = []
    bundle = fused["gpt2"]
    with Engine.load(bundle.path, backend="ort", threads=1, limits=EngineLimits(max_batch=4),
                     on_step=lambda b, s: sizes.append(b)) as engine:
        assert engine.runtime.shares_kv_buffer
        alone = [engine.submit(p, **o).wait() for p, o in zip(prompts, options)]
        sizes.clear()
        tickets = [engine.submit(p, **o) for p, o in zip(prompts, options)]
        for ticket, want in zip(tickets, alone):
            got = ticket.wait()
            assert got.token_ids == want.token_ids and got.text == want.text
    assert max(sizes) > 1


def test_manifest_records_the_capability_as_an_optional_field(fused, tmp_path):
    bundle = fused["gpt2"]
    raw = json.loads((bundle.path / MANIFEST).read_text())
    entry = raw["graphs"]["fp32"]
    assert entry["kv_shared_buffer"] is True
    config = bundle.config
    assert GraphEntry.from_dict("fp32", {k: v for k, v in entry.items() if k != "kv_shared_buffer"}, config).kv_shared_buffer is False
    assert "kv_shared_buffer" not in dataclasses.replace(bundle.graph(), kv_shared_buffer=False).to_dict()
    with pytest.raises(BundleError, match="kv_shared_buffer must be true or false"):
        GraphEntry.from_dict("fp32", dict(entry, kv_shared_buffer="yes"), config)


def test_int8_kv_cache_is_int8_end_to_end_and_within_the_int4_bounds(fused, tmp_path):
    bundle = fused["llama-int4-kv8"]
    graph = bundle.graph()
    assert graph.signature.kv_dtype == "int8" and graph.kv_shared_buffer
    record = bundle.manifest.parity["int4"]
    assert record["passed"] and record["graph"]["quantization"]["kv_cache"].startswith("int8")
    raw = json.loads((bundle.path / MANIFEST).read_text())["graphs"]["int4"]
    assert raw["kv_dtype"] == "int8" and {s["dtype"] for s in raw["io"]["outputs"][1:]} == {"int8"}
    _, cache, _ = _chain(bundle, shared=True, steps=4)
    assert {a.dtype for a in cache} == {np.dtype(np.int8)}
    with OrtRuntime(bundle, graph, threads=1) as rt:  # the engine's cache moves keep the dtype
        rt.put_cache(cache)
        assert all(np.array_equal(a, b) for a, b in zip(rt.take_cache(), cache))
    from gptdeploy.exporters.verify import verify_bundle

    assert verify_bundle(bundle.path, integrity_only=True).io_problems == []  # graph IO says int8 too


def test_int8_kv_cache_is_refused_where_no_bound_measures_it(tmp_path):
    from click.testing import CliRunner

    from gptdeploy.cli import cli
    from gptdeploy.errors import ExportError

    src = make_hf_gpt2_dir(tmp_path / "src", n_layer=1, n_head=2, n_embd=16, seed=0)
    with pytest.raises(ExportError, match="an int8 KV cache is for int8 and int4 graphs"):
        export_bundle(src, tmp_path / "b", kv_cache="int8")
    r = CliRunner().invoke(cli, ["export", str(src), "-o", str(tmp_path / "b"), "--kv-cache", "int8"])
    assert r.exit_code == 2 and "add --int8 or --int4" in r.stderr and not (tmp_path / "b").exists()
