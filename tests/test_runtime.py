"""Runtimes: the `ort` runtime against the `torch` reference step by step, the KV cache kept as
OrtValues, the protocol's checks, the backend registry, and weights read back from a graph."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxruntime.capi import _pybind_state as C

from gptdeploy import machine
from gptdeploy.bundle import Bundle
from gptdeploy.config import GPTConfig
from gptdeploy.errors import BackendUnavailable, BundleError, GenerationError
from gptdeploy.exporters.onnx import export_onnx
from gptdeploy.modeling import GPT
from gptdeploy.runtimes import backends
from gptdeploy.runtimes.backends import open_runtime
from gptdeploy.runtimes.ort import OrtRuntime
from gptdeploy.runtimes.torch import TorchRuntime, graph_state_dict
from tests.runtime_bundles import greedy_steps, left_padded, made

# Same fp32 math, different GEMM order (MLAS vs ATen): measured max |diff| ~2e-6 on logits.
LOGITS_TOL = 1e-4
ATTN_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load(made("padded").bundle)


def test_ort_matches_torch_step_by_step_with_left_padding(bundle):
    ids, mask, pos = left_padded([7, 3, 1], bundle.config.vocab_size)
    with open_runtime(bundle, "ort", threads=1) as rt_ort, open_runtime(bundle, "torch") as rt_torch:
        assert isinstance(rt_ort, OrtRuntime) and isinstance(rt_torch, TorchRuntime)
        got = greedy_steps(rt_ort, ids, mask, pos, 6, record=True)
        want = greedy_steps(rt_torch, ids, mask, pos, 6, record=True)
    c = bundle.config
    for step, (g, w) in enumerate(zip(got, want)):
        T = ids.shape[1] if step == 0 else 1
        assert g.logits.shape == (3, c.vocab_size) and g.logits.dtype == np.float32
        np.testing.assert_allclose(g.logits, w.logits, atol=LOGITS_TOL, rtol=0, err_msg=f"step {step}")
        assert len(g.attentions) == c.n_layer
        for layer, (ga, wa) in enumerate(zip(g.attentions, w.attentions)):
            assert ga.shape == (3, c.n_head, T, ids.shape[1] + step)
            np.testing.assert_allclose(ga, wa, atol=ATTN_TOL, rtol=0, err_msg=f"step {step} layer {layer}")


def test_ort_keeps_the_kv_cache_as_ortvalues_and_fetches_attention_only_on_request(bundle):
    ids, mask, pos = left_padded([4], bundle.config.vocab_size)
    with OrtRuntime(bundle, bundle.graph(), threads=1) as rt:
        out = rt.prefill(ids, mask, pos, record_attention=False)
        assert out.attentions is None
        assert rt.past_length == 4
        assert len(rt._past) == 2 * bundle.config.n_layer
        assert all(isinstance(v, C.OrtValue) for v in rt._past)  # never numpy
        assert rt._past[0].shape() == [1, bundle.config.n_head, 4, bundle.config.head_dim]
        out = rt.decode(
            np.array([[5]]), np.ones((1, 5), dtype=np.int64), np.array([[4]]), record_attention=True
        )
        assert [a.shape for a in out.attentions] == [(1, bundle.config.n_head, 1, 5)] * bundle.config.n_layer
        assert rt.past_length == 5 and rt._past[0].shape()[2] == 5
        rt.reset()
        assert rt.past_length == 0 and rt._past == []


def test_unrecorded_attention_shares_one_scratch_buffer_without_changing_any_value(bundle):
    """Not recording, every layer's attention output is bound to one scratch buffer (so that a long
    prefill does not hold n_layer probability tensors): logits and KV cache stay bit-identical to a
    recording run, step by step, with left padding."""
    ids, mask, pos = left_padded([6, 2, 4], bundle.config.vocab_size, seed=5)
    with open_runtime(bundle, "ort", threads=1) as rt:
        recorded = greedy_steps(rt, ids, mask, pos, 4, record=True)
        kv_recorded = [v.numpy() for v in rt._past]
        plain = greedy_steps(rt, ids, mask, pos, 4, record=False)
        kv_plain = [v.numpy() for v in rt._past]
        scratch = rt._keep[-1]
    assert scratch.shape == (3, bundle.config.n_head, 1, ids.shape[1] + 4)  # the last decode step's
    for step, (a, b) in enumerate(zip(recorded, plain)):
        np.testing.assert_array_equal(a.logits, b.logits, err_msg=f"step {step}")
        assert b.attentions is None
    for a, b in zip(kv_recorded, kv_plain):
        np.testing.assert_array_equal(a, b)


def test_prefill_restarts_the_cache_and_gives_the_same_logits(bundle):
    ids, mask, pos = left_padded([5, 2], bundle.config.vocab_size, seed=3)
    with open_runtime(bundle, "ort", threads=1) as rt:
        first = greedy_steps(rt, ids, mask, pos, 3, record=False)
        again = greedy_steps(rt, ids, mask, pos, 3, record=False)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.logits, b.logits)


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_protocol_misuse_is_a_clear_error(bundle, backend):
    rt = open_runtime(bundle, backend, threads=1)
    one = np.ones((1, 1), dtype=np.int64)
    with pytest.raises(GenerationError, match="before prefill"):
        rt.decode(one, np.ones((1, 1), dtype=np.int64), one)
    with pytest.raises(GenerationError, match="prefill needs"):
        rt.prefill(
            np.ones((1, 3), dtype=np.int64), np.ones((1, 2), dtype=np.int64), np.zeros((1, 3), dtype=np.int64)
        )
    rt.prefill(
        np.ones((2, 3), dtype=np.int64), np.ones((2, 3), dtype=np.int64), np.tile(np.arange(3), (2, 1))
    )
    with pytest.raises(GenerationError, match=r"attention_mask \(2, 4\)"):
        rt.decode(np.ones((2, 1), dtype=np.int64), np.ones((2, 3), dtype=np.int64), np.full((2, 1), 3))
    rt.close()
    rt.close()  # idempotent
    with pytest.raises(GenerationError, match="closed"):
        rt.prefill(one, one, one - 1)


def test_recording_needs_a_graph_with_attention_outputs():
    b = Bundle.load(made("small", attentions=False).bundle)
    assert not b.graph().signature.attentions
    with open_runtime(b, "ort", threads=1) as rt:
        one = np.ones((1, 1), dtype=np.int64)
        assert rt.prefill(one, one, one - 1).attentions is None
        with pytest.raises(GenerationError, match="no attention outputs"):
            rt.prefill(one, one, one - 1, record_attention=True)


def test_registry_names_what_is_missing(bundle, monkeypatch):
    assert backends.resolve_backend("auto") == "ort"
    assert {"ort", "torch"} <= set(backends.available_backends())
    with pytest.raises(BackendUnavailable, match="unknown backend 'onnx'.*ort, ort-cuda, tensorrt, torch"):
        open_runtime(bundle, "onnx")
    with pytest.raises(BackendUnavailable, match="(?i)tensorrt is not installed"):
        open_runtime(bundle, "tensorrt")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
            open_runtime(bundle, "ort-cuda")
    with pytest.raises(BundleError, match="no graph 'int8'"):
        open_runtime(bundle, "ort", graph="int8")
    with pytest.raises(GenerationError, match="threads"):
        open_runtime(bundle, "ort", threads=0)
    monkeypatch.setattr(backends, "missing", lambda name: "onnxruntime is broken")
    with pytest.raises(BackendUnavailable, match="no runtime backend is usable"):
        backends.resolve_backend("auto")


def test_ort_defaults_to_physical_cores_and_explicit_providers(bundle):
    assert 1 <= machine.physical_cores() <= (len(__import__("os").sched_getaffinity(0)))
    with OrtRuntime(bundle, bundle.graph()) as rt:
        assert rt.threads == machine.physical_cores()
        assert rt._session.get_providers() == ["CPUExecutionProvider"]


def test_a_graph_that_breaks_the_contract_is_a_bundle_error(bundle, tmp_path):
    import shutil

    from gptdeploy.bundle import write_manifest

    copy = tmp_path / "b"
    shutil.copytree(bundle.path, copy)
    m = Bundle.load(copy).manifest
    g = m.graphs["fp32"]
    from dataclasses import replace

    m.graphs["fp32"] = replace(g, signature=replace(g.signature, attentions=False))  # graph still has them
    write_manifest(copy, m)
    with pytest.raises(BundleError, match="does not match its manifest entry.*attentions.0"):
        open_runtime(Bundle.load(copy), "ort")


def test_weights_read_back_from_a_graph_equal_the_module(tmp_path):
    """Fresh LayerNorms are identical, so the tracer stores one copy; the structure still finds each."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=50, block_size=32, bias=True)
    torch.manual_seed(0)
    model = GPT(cfg).eval()  # LayerNorm weights all ones, biases all zeros: deduplicated by the tracer
    export_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert len(proto.graph.initializer) < len(model.state_dict())  # the deduplication happened
    state = graph_state_dict(proto)
    want = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sorted(state) == sorted(want)
    for k, value in want.items():
        np.testing.assert_array_equal(state[k], value, err_msg=k)


def test_auto_falls_back_when_a_gpu_backend_cannot_run_this_bundle(bundle, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("fake_gpu_runtime")

    def refuse(b, graph, threads):
        raise BundleError("no engine in the bundle runs here")

    fake.open_runtime = refuse
    monkeypatch.setitem(sys.modules, "fake_gpu_runtime", fake)
    fake_backend = replace(backends.BACKENDS["tensorrt"], module="fake_gpu_runtime", packages=())
    monkeypatch.setitem(backends.BACKENDS, "tensorrt", fake_backend)
    assert backends.resolve_backend("auto") == "tensorrt"
    with open_runtime(bundle, "auto", threads=1) as rt:
        assert rt.name == "ort"
    with pytest.raises(BundleError, match="no engine"):
        open_runtime(bundle, "tensorrt")  # asked for by name: no silent fallback


def test_torch_cuda_without_a_gpu_names_what_is_missing():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device; tests/test_gpu.py covers torch-cuda")
    with pytest.raises(BackendUnavailable, match=r"backend 'torch-cuda' is unavailable: torch .* sees no CUDA device"):
        backends.resolve_backend("torch-cuda")
    assert "torch-cuda" not in backends.available_backends()
