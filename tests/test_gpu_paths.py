"""The GPU paths' failure modes, on the CPU: what a wrong cuda-python, a CPU-fallback onnxruntime
session, a context TensorRT cannot create, refused profile shapes, an Ampere-only build on an older
GPU and a version-compatible engine on an unsupported TensorRT each turn into (tests/fake_tensorrt.py
stands in for TensorRT and cudart; a fake onnxruntime module for the CUDA provider)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import onnxruntime as real_ort
import pytest

from gptdeploy.bundle import Bundle
from gptdeploy.engines import compat_check
from gptdeploy.errors import BackendUnavailable, ExportError, RuntimeFailure
from gptdeploy.exporters.tensorrt import build_engine
from gptdeploy.exporters.tensorrt import builder as tensorrt_build
from gptdeploy.runtimes import cuda, ort_cuda
from gptdeploy.runtimes.tensorrt import TensorRTRuntime, missing
from tests.fake_tensorrt import FakeCudart, install_cudart, make_tensorrt
from tests.runtime_bundles import copy_bundle, made

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture
def bundle_dir(tmp_path):
    return copy_bundle(made("padded").bundle, tmp_path / "b")


def _fakes(monkeypatch, **cudart_kw):
    cudart = FakeCudart(**cudart_kw)
    install_cudart(monkeypatch, cudart)
    trt = make_tensorrt(cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return cudart, trt


# ------------------------------------------------------------------- a: cuda-python vs the driver


def test_each_gpu_extra_stays_on_one_cuda_major():
    """CUDA 12 throughout: the bare `tensorrt` meta-package installs tensorrt_cu13 (10.16.1.11's
    PKG-INFO: Requires-Dist tensorrt_cu13), onnxruntime-gpu on PyPI needs nvidia-cuda-runtime-cu12
    from 1.19 to 1.26 and CUDA 13 from 1.27 (their requires_dist), cuda-python 13 a CUDA 13 driver."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["onnxruntime-gpu>=1.19,<1.27", "cuda-python>=12,<13"]
    assert extras["tensorrt"] == ["tensorrt-cu12>=10.1", "cuda-python>=12,<13"]


def test_a_driver_older_than_cuda_python_is_named_not_called_no_gpu(monkeypatch, bundle_dir):
    _fakes(monkeypatch, device_error=35)  # cuda-bindings 13 on a CUDA 12 driver
    problem = missing()
    assert "cudaGetDeviceCount failed with cudaErrorInsufficientDriver" in problem
    assert "pip install 'cuda-python>=12,<13'" in problem and "no NVIDIA GPU" not in problem
    with pytest.raises(BackendUnavailable, match="cudaErrorInsufficientDriver .*upgrade the driver"):
        build_engine(bundle_dir, max_batch=1, max_context=8)


def test_failed_cuda_calls_say_the_error_name_and_the_fix():
    cudart = FakeCudart()
    with pytest.raises(RuntimeFailure, match=r"cudaMalloc\(8\) failed: cudaErrorMemoryAllocation \(out of"):
        cuda.call(cudart, (2,), "cudaMalloc(8)")
    assert cuda.call(cudart, (0, 7), "x") == 7


# ---------------------------------------------------------------- b: ort-cuda's silent CPU session


class _Session:
    """An onnxruntime session as CUDA-less onnxruntime-gpu makes it: on the CPU provider only."""

    def __init__(self, path, so, got):
        self._real = real_ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self._got, self.fallback = got, True

    def get_providers(self):
        return list(self._got)

    def disable_fallback(self):
        self.fallback = False

    def __getattr__(self, name):
        return getattr(self._real, name)


def _fake_ort(monkeypatch, got, log=b"", printed=""):
    """onnxruntime that lists CUDA, then makes sessions on `got` after writing `log` to stderr (its C++
    logger) and `printed` to stdout (its Python fallback notice)."""
    made_sessions = []

    def session(path, so, providers):
        assert providers[0][0] == ort_cuda.CUDA_EP
        os.write(2, log)
        if printed:
            print(printed)
        made_sessions.append(_Session(path, so, got))
        return made_sessions[-1]

    fake = types.SimpleNamespace(
        get_available_providers=lambda: [ort_cuda.CUDA_EP, "CPUExecutionProvider"],
        InferenceSession=session,
        SessionOptions=real_ort.SessionOptions,
        GraphOptimizationLevel=real_ort.GraphOptimizationLevel,
        OrtValue=real_ort.OrtValue,
    )
    monkeypatch.setattr(ort_cuda, "ort", fake)
    return made_sessions


LOG = (
    b"[E:onnxruntime:Default, provider_bridge_ort.cc:2195 TryGetProviderInfo_CUDA] Failed to load library "
    b"libonnxruntime_providers_cuda.so with error: libcublasLt.so.12: cannot open shared object file: "
    b"No such file or directory\n[W:onnxruntime:Default, onnxruntime_pybind_state.cc:1052] Failed to "
    b"create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.*.\n"
)


def test_ort_cuda_refuses_a_session_onnxruntime_made_on_the_cpu(monkeypatch, capfd):
    _fake_ort(monkeypatch, ["CPUExecutionProvider"], log=LOG)
    b = Bundle.load(made("padded").bundle)
    with pytest.raises(BackendUnavailable) as caught:
        ort_cuda.OrtCudaRuntime(b, b.graph())
    message = str(caught.value)
    assert "\n" not in message and "could not load libcublasLt.so.12 for CUDAExecutionProvider" in message
    assert "made the session on the CPU" in message
    assert "Failed to create CUDAExecutionProvider" in capfd.readouterr().err  # its log still reaches stderr


def test_ort_cuda_without_a_library_name_says_how_to_check(monkeypatch, capfd):
    _fake_ort(monkeypatch, ["CPUExecutionProvider"], printed="EP Error CUDA failure 35: driver too old")
    b = Bundle.load(made("padded").bundle)
    with pytest.raises(BackendUnavailable, match=r"did not start \(EP Error CUDA failure 35.*nvidia-smi"):
        ort_cuda.OrtCudaRuntime(b, b.graph())
    assert "EP Error CUDA failure 35" in capfd.readouterr().out


def test_ort_cuda_accepts_a_cuda_session_and_turns_off_the_cpu_fallback(monkeypatch):
    sessions = _fake_ort(monkeypatch, [ort_cuda.CUDA_EP, "CPUExecutionProvider"])
    b = Bundle.load(made("padded").bundle)
    ort_cuda.OrtCudaRuntime(b, b.graph()).close()
    assert [s.fallback for s in sessions] == [False]  # a provider failure mid-run raises, never reruns on CPU


# --------------------------------------------------- c, d: contexts and profiles TensorRT refuses


def test_a_context_tensorrt_cannot_create_is_a_clear_error_and_frees_everything(monkeypatch, bundle_dir):
    cudart, _ = _fakes(monkeypatch)
    build_engine(bundle_dir, max_batch=1, max_context=8)
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(cudart, context_fails=True))
    b = Bundle.load(bundle_dir)
    with pytest.raises(BackendUnavailable, match=r"could not create the prefill execution context .*"
                       r"free GPU memory .*lower the limits: gptdeploy build-engine"):
        TensorRTRuntime(b, b.graph())
    assert cudart.memory == {} and cudart.pinned == {} and cudart.streams == set()


def test_refused_profile_shapes_name_the_tensor(monkeypatch, tmp_path):
    cudart, trt = _fakes(monkeypatch)
    good = ((1, 1), (1, 2), (1, 4))
    profiles = {"prefill": {"input_ids": ((1, 8), (1, 2), (1, 4))}, "decode": {"input_ids": good}}
    with pytest.raises(
        ExportError,
        match=r"refused the prefill profile shapes of input_ids "
        r"\(min \(1, 8\), opt \(1, 2\), max \(1, 4\)\): Shape provided for min is inconsistent",
    ):
        tensorrt_build.build(trt, tmp_path / "g.onnx", profiles, workspace_bytes=1, hardware_compat=False,
                             version_compat=False, timing_cache=tmp_path / "c")
    assert trt.built == []


# ------------------------------------------------------ e: hardware and version compatibility


def test_hardware_compat_on_a_pre_ampere_gpu_fails_before_the_build(monkeypatch, bundle_dir):
    _, trt = _fakes(monkeypatch, cc=(7, 5), name=b"Tesla T4")
    with pytest.raises(ExportError, match=r"compute capability >= 8\.0\); this GPU \(Tesla T4\) is 7\.5"):
        build_engine(bundle_dir, max_batch=1, max_context=8, hardware_compat=True)
    assert trt.built == [] and not (bundle_dir / "engines").exists()
    assert build_engine(bundle_dir, max_batch=1, max_context=8)["file"].startswith("engines/sm75-")


def _vc_entry(version: str) -> dict:
    return {"file": "engines/e.engine", "sha256": "0" * 64, "graph": "fp32", "compute_capability": "9.0",
            "trt_version": version, "profiles": {}, "limits": {}, "version_compatible": True}


@pytest.mark.parametrize(
    "built, here, runs",
    [
        ("10.13.0", "10.13.0", True),
        ("10.13.0", "10.15.1", True),  # later releases of the same major
        ("10.13.0", "10.12.0", False),  # never an older runtime
        ("10.13.0", "11.2.0", True),  # TensorRT 10 engines on a TensorRT 11 runtime
        ("10.13.0", "12.0.0", False),
        ("8.6.1", "10.4.0", True),  # TensorRT 8 engines on a TensorRT 10 runtime
        ("8.6.1", "11.0.0", False),  # "No other combination across major versions is supported"
        ("8.5.3", "10.4.0", False),  # version compatibility begins with 8.6
        ("11.0.0", "11.1.0", True),
        ("11.1.0", "10.15.0", False),
    ],
)
def test_version_compatible_engines_run_where_nvidia_supports_them(built, here, runs):
    problem = compat_check(_vc_entry(built), "9.0", here, "b")
    assert (problem is None) == runs, problem
    if not runs:
        assert problem.endswith("gptdeploy build-engine b --graph fp32 --version-compat")
