"""`build-engine` and the `tensorrt` / `ort-cuda` runtimes end to end on the CPU.

TensorRT and cuda-python are replaced by tests/fake_tensorrt.py (strict about bound tensors,
profile ranges and overlapping buffers; its "engine" runs the graph with onnxruntime), and
`ort-cuda` runs its IOBinding logic on the CPU provider. What this checks: the manifest and
files a build writes, the timing cache round trip, every parser error reported together, the
KV ping-pong step for step against the `ort` runtime with one context per profile and pinned host
copies, attention copies only on request, clear errors for foreign engines and limits, and that
close() frees everything.
What it cannot check: TensorRT's own numerics and kernels (tests/test_gpu.py does, on a GPU).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from gptdeploy.bundle import Bundle
from gptdeploy.errors import (
    BackendUnavailable,
    BundleError,
    ContextOverflowError,
    ExportError,
    GenerationError,
)
from gptdeploy.exporters.tensorrt import build_engine
from gptdeploy.runtimes.ort import OrtRuntime
from gptdeploy.runtimes.ort_cuda import OrtCudaRuntime
from gptdeploy.runtimes.tensorrt import TensorRTRuntime, missing
from tests.fake_tensorrt import FakeCudart, install_cudart, make_tensorrt
from tests.runtime_bundles import copy_bundle, greedy_steps, left_padded, made


@pytest.fixture
def fake(monkeypatch):
    """Install fake cudart + tensorrt; returns (cudart, tensorrt module, installer for another one)."""
    cudart = FakeCudart()
    install_cudart(monkeypatch, cudart)
    trt = make_tensorrt(cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)

    def swap(**kw):
        new = make_tensorrt(cudart, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", new)
        return new

    return cudart, trt, swap


@pytest.fixture
def bundle_dir(tmp_path):
    return copy_bundle(made("padded").bundle, tmp_path / "b")


def test_build_writes_engine_timing_cache_and_manifest_entry(fake, bundle_dir):
    cudart, trt, _ = fake
    entry = build_engine(bundle_dir, max_batch=3, max_context=24, workspace_gb=0.5)
    assert entry["file"] == "engines/sm90-trt10.13.0-fp32.engine" and entry["graph"] == "fp32"
    assert entry["limits"] == {"max_batch": 3, "max_context": 24} and entry["workspace_bytes"] == 1 << 29
    assert entry["precision_plan"]["precision"] == "fp32" and entry["device_name"] == "Fake H100"
    assert trt.built == [{"flags": [], "pool": {"WORKSPACE": 1 << 29}, "hw": "NONE"}]  # TF32 cleared
    b = Bundle.load(bundle_dir)  # the engine's SHA-256 is listed and checked like every file
    assert b.manifest.engines == [entry] and b.manifest.files[entry["file"]] == entry["sha256"]
    assert json.loads((bundle_dir / entry["timing_cache"]).read_text()) == ["tactics for model.onnx"]
    assert not [p for p in (bundle_dir / "engines").iterdir() if p.name.startswith(".")]  # no temp files left

    again = build_engine(bundle_dir, max_batch=2, max_context=24, version_compat=True, hardware_compat=True)
    b = Bundle.load(bundle_dir)
    assert [e["file"] for e in b.manifest.engines] == [
        entry["file"],
        "engines/sm80plus-trt10.13.0-fp32.engine",
    ]
    assert again["flags"] == ["STRONGLY_TYPED", "no TF32", "VERSION_COMPATIBLE", "AMPERE_PLUS"]
    assert trt.built[-1]["hw"] == "AMPERE_PLUS"
    # The cache was loaded and extended, not started over.
    assert len(json.loads((bundle_dir / entry["timing_cache"]).read_text())) == 2
    build_engine(bundle_dir, max_batch=4, max_context=24)  # same file: the entry is replaced, not added
    assert [e["limits"]["max_batch"] for e in Bundle.load(bundle_dir).manifest.engines] == [2, 4]


def test_every_parser_error_is_reported_together(fake, bundle_dir):
    _, _, swap = fake
    swap(parser_errors=["MatMulNBits: no importer", "Attention: past_key unsupported"])
    with pytest.raises(
        ExportError,
        match=r"rejected model.onnx \(2 error\(s\)\): In node 0 .*MatMulNBits.* \| "
        r"In node 1 .*past_key",
    ):
        build_engine(bundle_dir, max_batch=1, max_context=8)
    assert Bundle.load(bundle_dir).manifest.engines == []


@pytest.mark.parametrize("record", [True, False])
def test_tensorrt_runtime_matches_ort_step_by_step(fake, bundle_dir, record):
    cudart, _, _ = fake
    build_engine(bundle_dir, max_batch=3, max_context=20)
    b = Bundle.load(bundle_dir)
    ids, mask, pos = left_padded([7, 3, 1], b.config.vocab_size)
    with OrtRuntime(b, b.graph(), threads=1) as ref, TensorRTRuntime(b, b.graph()) as rt:
        allocated = len(cudart.memory)
        want = greedy_steps(ref, ids, mask, pos, 8, record)
        got = greedy_steps(rt, ids, mask, pos, 8, record)
        assert len(cudart.memory) == allocated  # nothing allocated per step
        again = greedy_steps(rt, ids[:1], mask[:1], pos[:1], 2, record)  # a new prefill with a smaller batch
        # One context per profile, the decode one switched once at load; no switch per generation.
        contexts = rt._engine.contexts
        assert contexts == rt._contexts and [c.active_optimization_profile for c in contexts] == [0, 1]
        assert [c.profile_switches for c in contexts] == [0, 1]
        assert contexts[0].memory == contexts[1].memory  # one activation buffer for both
        assert cudart.pageable_copies == 0 and cudart.pinned  # logits / attentions land in pinned memory
    for step, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g.logits, w.logits, err_msg=f"step {step}")
        assert (g.attentions is None) == (not record)
        if record:
            for ga, wa in zip(g.attentions, w.attentions):
                np.testing.assert_array_equal(ga, wa)
    np.testing.assert_array_equal(again[0].logits, want[0].logits[:1])
    # close() freed every device and pinned buffer and the stream
    assert cudart.memory == {} and cudart.pinned == {} and cudart.streams == set()


def test_ort_cuda_binding_logic_matches_ort_on_the_cpu_provider():
    b = Bundle.load(made("padded").bundle)
    ids, mask, pos = left_padded([5, 2], b.config.vocab_size, seed=4)
    with OrtRuntime(b, b.graph(), threads=1) as ref, OrtCudaRuntime(b, b.graph(), 1, device="cpu") as rt:
        want = greedy_steps(ref, ids, mask, pos, 6, True)
        got = greedy_steps(rt, ids, mask, pos, 6, True)
        kv = {k: tuple(v.data_ptr() for v in pair) for k, pair in rt._kv.items()}
        greedy_steps(rt, ids, mask, pos, 3, False)
        assert kv == {k: tuple(v.data_ptr() for v in pair) for k, pair in rt._kv.items()}  # buffers reused
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.logits, w.logits)
        for ga, wa in zip(g.attentions, w.attentions):
            np.testing.assert_array_equal(ga, wa)


def test_engine_for_another_gpu_or_tensorrt_is_a_bundle_error_with_the_rebuild_command(
    fake, bundle_dir, monkeypatch
):
    cudart, _, swap = fake
    build_engine(bundle_dir, max_batch=2, max_context=16)
    b = Bundle.load(bundle_dir)
    cudart.cc = (8, 6)
    with pytest.raises(
        BundleError,
        match=rf"compute capability 9\.0; this GPU is 8\.6; rebuild it here: "
        rf"gptdeploy build-engine {bundle_dir} --graph fp32 --max-batch 2",
    ):
        TensorRTRuntime(b, b.graph())
    cudart.cc = (9, 0)
    swap(version="10.14.0.1")
    with pytest.raises(BundleError, match=r"built with TensorRT 10\.13\.0; this machine has 10\.14\.0"):
        TensorRTRuntime(b, b.graph())
    assert cudart.memory == {}  # refused before anything was allocated


def test_version_compatible_engines_allow_their_host_code(fake, bundle_dir, monkeypatch):
    _, trt, swap = fake
    build_engine(bundle_dir, max_batch=1, max_context=8, version_compat=True)
    later = swap(version="10.15.0.2")
    b = Bundle.load(bundle_dir)
    with TensorRTRuntime(b, b.graph()) as rt:
        assert rt._trt_runtime is not None and rt._trt_runtime.engine_host_code_allowed is True
        assert rt.entry["trt_version"] == "10.13.0" and later.__version__ == "10.15.0.2"


def test_limits_of_the_engine_are_clear_errors(fake, bundle_dir):
    build_engine(bundle_dir, max_batch=1, max_context=6)
    b = Bundle.load(bundle_dir)
    with TensorRTRuntime(b, b.graph()) as rt:
        with pytest.raises(GenerationError, match=r"batch 2 exceeds the engine's 1; gptdeploy build-engine"):
            rt.prefill(*left_padded([2, 2], 50))
        greedy_steps(rt, *left_padded([4], 50), 2, False)
        with pytest.raises(ContextOverflowError, match=r"7 positions exceed the engine's 6"):
            rt.decode(np.ones((1, 1), dtype=np.int64), np.ones((1, 7), dtype=np.int64), np.full((1, 1), 6))


def test_no_engine_for_the_graph_and_a_corrupt_engine(fake, bundle_dir):
    b = Bundle.load(bundle_dir)
    with pytest.raises(
        BundleError, match=r"no TensorRT engine for graph 'fp32'; build one: gptdeploy build-engine"
    ):
        TensorRTRuntime(b, b.graph())
    entry = build_engine(bundle_dir, max_batch=1, max_context=8)
    (bundle_dir / entry["file"]).write_bytes(b"not a plan")
    b = Bundle.load(bundle_dir, verify_hashes=False)
    with pytest.raises(
        BundleError, match=r"TensorRT cannot load engine engines/sm90.*gptdeploy build-engine"
    ):
        TensorRTRuntime(b, b.graph())
    with pytest.raises(BundleError, match="does not match its SHA-256"):
        Bundle.load(bundle_dir)


def test_availability_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert missing().startswith("TensorRT is not installed")
    cudart = FakeCudart(devices=0)
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(cudart))
    install_cudart(monkeypatch, cudart)
    assert "no NVIDIA GPU is visible to CUDA" in missing()
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(cudart, version="8.6.1"))
    assert "TensorRT 8.6.1 is too old" in missing()
    b = Bundle.load(made("small").bundle)
    with pytest.raises(BackendUnavailable, match="too old"):
        TensorRTRuntime(b, b.graph())


# -- the batching engine on the device runtimes: their KV buffers to the host and back ------------------


def _joins_mid_batch_as_alone(runtime, tokenizer, bundle) -> None:
    from gptdeploy.engine import Engine, EngineLimits

    prompts = ["The quick brown fox", "你好", "A", "Numbers 0123"]
    options = [{"max_new_tokens": 20}, {"max_new_tokens": 9, "temperature": 1.0, "seed": 3},
               {"max_new_tokens": 14}, {"max_new_tokens": 5, "temperature": 0.7, "seed": 1}]
    assert runtime.can_move_cache
    with Engine(runtime, tokenizer, bundle, EngineLimits(max_batch=3)) as engine:
        alone = [engine.submit(p, **o).wait().token_ids for p, o in zip(prompts, options)]
        tickets = [engine.submit(p, **o) for p, o in zip(prompts, options)]  # 4 requests, 3 rows
        assert [t.wait().token_ids for t in tickets] == alone


def test_the_engine_batches_continuously_on_tensorrt(fake, bundle_dir):
    from gptdeploy.tokenizer import Tokenizer

    build_engine(bundle_dir, max_batch=3, max_context=40)
    b = Bundle.load(bundle_dir)
    rt = TensorRTRuntime(b, b.graph())
    ids, mask, pos = left_padded([4, 2], b.config.vocab_size)
    rt.prefill(ids, mask, pos)
    cache = rt.take_cache()
    rt.put_cache(cache)
    np.testing.assert_array_equal(rt.take_cache()[3], cache[3])
    with pytest.raises(GenerationError, match="batch 4 exceeds the engine's 3"):
        rt.put_cache([np.concatenate([c, c]) for c in cache])
    _joins_mid_batch_as_alone(rt, Tokenizer.from_bundle(b), b)


def test_the_engine_batches_continuously_on_ort_cuda_buffers():
    from gptdeploy.tokenizer import Tokenizer

    b = Bundle.load(made("padded").bundle)
    _joins_mid_batch_as_alone(OrtCudaRuntime(b, b.graph(), 1, device="cpu"), Tokenizer.from_bundle(b), b)
