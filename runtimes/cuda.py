"""CUDA through cuda-python (NVIDIA's bindings): device queries, device buffers and a stream.

No torch on the run path: the TensorRT runtime and `build-engine` get device memory and the
GPU's compute capability from here. Every cudart call returns a tuple whose first element is a
`cudaError_t` (cuda-python's convention, as in NVIDIA/TensorRT `samples/python/common_runtime.py`
`cuda_call` and NVIDIA/cuda-python `cuda_bindings/examples/common/helper_cuda.py` `checkCudaErrors`);
`call` checks it and returns the rest.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from gptdeploy.errors import BackendUnavailable, GenerationError

INSTALL = "pip install 'gptdeploy[tensorrt]'"


def load_cudart():
    """The cudart module of cuda-python: `cuda.bindings.runtime` (cuda-python >= 12.6), or the older
    `cuda.cudart` that TensorRT's samples import. BackendUnavailable when neither imports."""
    errors = []
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError as exc:  # also a broken install whose shared library is missing
            errors.append(f"{name}: {exc}")
    raise BackendUnavailable(f"cuda-python is not installed ({errors[0]}); {INSTALL}")


def call(cudart, result, what: str):
    """Unpack `(err, *values)`; raise GenerationError naming the call when err is not cudaSuccess."""
    err, values = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        text = name.decode() if isinstance(name, bytes) else str(name)
        raise GenerationError(f"CUDA call {what} failed: {text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"
    total_memory: int  # bytes


def device_count(cudart) -> int:
    """Visible CUDA devices; 0 when the driver is missing or no GPU is present (never raises)."""
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception:  # noqa: BLE001 - a driver-less machine can fail inside the binding itself
        return 0
    return int(count) if err == cudart.cudaError_t.cudaSuccess else 0


def device_info(cudart, index: int = 0) -> DeviceInfo:
    """Name, compute capability and memory of one device (cudaGetDeviceProperties)."""
    prop = call(cudart, cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(index, name.rstrip("\x00"), f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem))


def memory_in_use(cudart) -> int:
    """Bytes of the current device in use by every process and context (cudaMemGetInfo: total - free)."""
    free, total = call(cudart, cudart.cudaMemGetInfo(), "cudaMemGetInfo")
    return int(total) - int(free)


def require_gpu(cudart) -> DeviceInfo:
    if device_count(cudart) < 1:
        raise BackendUnavailable(
            "no NVIDIA GPU is visible to CUDA (cudaGetDeviceCount found none); TensorRT needs one. "
            "Check the driver with nvidia-smi"
        )
    return device_info(cudart, 0)


class DeviceBuffer:
    """One cudaMalloc'd allocation; `free()` releases it (owned by the runtime, never by __del__)."""

    def __init__(self, cudart, nbytes: int, what: str):
        self.cudart = cudart
        self.nbytes = max(int(nbytes), 1)  # a zero-byte cudaMalloc returns no usable address
        self.ptr = int(call(cudart, cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes}) for {what}"))

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            call(self.cudart, self.cudart.cudaFree(ptr), "cudaFree")


class Stream:
    """A CUDA stream with host<->device copies. Host arrays must stay alive until `synchronize()`.
    `handle` goes to TensorRT as is (common_runtime.py: `execute_async_v3(stream_handle=stream)`)."""

    def __init__(self, cudart):
        self.cudart = cudart
        self.handle = call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")

    def to_device(self, dst: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        if host.nbytes:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            call(
                self.cudart,
                self.cudart.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes, kind, self.handle),
                "cudaMemcpyAsync (host to device)",
            )

    def to_host(self, host: np.ndarray, src: int) -> None:
        if host.nbytes:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            call(
                self.cudart,
                self.cudart.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes, kind, self.handle),
                "cudaMemcpyAsync (device to host)",
            )

    def synchronize(self) -> None:
        call(self.cudart, self.cudart.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            call(self.cudart, self.cudart.cudaStreamDestroy(handle), "cudaStreamDestroy")
