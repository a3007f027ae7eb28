"""Skip `gpu` / `tensorrt` tests, with the reason, on machines that lack what they need; the
`one_torch_thread` fixture that the runtime and generation tests share."""

from __future__ import annotations

import functools
import importlib
import shutil
import subprocess

import pytest


@functools.lru_cache(maxsize=1)
def gpu_missing() -> str | None:
    """Why no NVIDIA GPU is usable here, or None. cuda-python first, then torch, then nvidia-smi."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            cudart = importlib.import_module(name)
        except ImportError:
            continue
        err, count = cudart.cudaGetDeviceCount()
        if err == cudart.cudaError_t.cudaSuccess and count > 0:
            return None
        return f"no NVIDIA GPU: cuda-python's cudaGetDeviceCount gives {err}, {count} devices"
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        if done.returncode == 0 and "GPU" in done.stdout:
            return None
    return "no NVIDIA GPU on this machine (cuda-python, torch.cuda and nvidia-smi find none)"


@functools.lru_cache(maxsize=1)
def tensorrt_missing() -> str | None:
    try:
        importlib.import_module("tensorrt")
    except ImportError as exc:
        return f"TensorRT is not installed ({exc}); pip install 'gptdeploy[tensorrt]'"
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            importlib.import_module(name)
            break
        except ImportError:
            continue
    else:
        return "cuda-python is not installed; pip install 'gptdeploy[tensorrt]'"
    return gpu_missing()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("tensorrt") and (reason := tensorrt_missing()) or item.get_closest_marker("gpu") and (reason := gpu_missing()):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on two shared cores: torch's second thread only waits (measured 2 ms vs 48 ms a
    forward of a 2-layer model with the cores loaded). Restored after the module."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
