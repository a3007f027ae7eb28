"""CUDA through cuda-python (NVIDIA's bindings): device queries, device and pinned host buffers, a stream.

No torch on the run path: the TensorRT runtime and `build-engine` get device memory and the
GPU's compute capability from here. Every cudart call returns a tuple whose first element is a
`cudaError_t` (cuda-python's convention, as in NVIDIA/TensorRT `samples/python/common_runtime.py`
`cuda_call` and NVIDIA/cuda-python `cuda_bindings/examples/common/helper_cuda.py` `checkCudaErrors`);
`call` checks it and returns the rest, naming a failure by cudaGetErrorName.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass

import numpy as np

from gptdeploy.errors import BackendUnavailable, GenerationError, RuntimeFailure

INSTALL = "pip install 'gptdeploy[tensorrt]'"
# What to do about the CUDA errors a user can fix (cudaError_t names, driver_types.h). cuda-python
# 13's runtime needs a CUDA 13 driver: on a CUDA 12 driver every call, cudaGetDeviceCount first,
# returns cudaErrorInsufficientDriver, which is not "no GPU".
FIXES = {
    "cudaErrorInsufficientDriver": (
        "the NVIDIA driver is older than the CUDA runtime of the installed cuda-python: upgrade the "
        "driver, or install the cuda-python of the driver's CUDA major (nvidia-smi's 'CUDA Version'), "
        "e.g. pip install 'cuda-python>=12,<13' for a CUDA 12 driver"
    ),
    "cudaErrorCallRequiresNewerDriver": "the call needs a newer NVIDIA driver: upgrade the driver",
    "cudaErrorNoDevice": "no NVIDIA GPU is visible to CUDA: check nvidia-smi and CUDA_VISIBLE_DEVICES",
    "cudaErrorMemoryAllocation": "out of GPU memory: free what others hold (nvidia-smi) or lower the limits",
}


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


def error_name(cudart, err) -> str:
    """`cudaErrorInsufficientDriver` for error 35 (cudaGetErrorName returns (cudaError_t, bytes))."""
    name = cudart.cudaGetErrorName(err)[1]
    return name.decode() if isinstance(name, bytes) else str(name)


def describe(cudart, err) -> str:
    """The error's name, and what to do about it when FIXES knows."""
    name = error_name(cudart, err)
    return f"{name} ({FIXES[name]})" if name in FIXES else name


def call(cudart, result, what: str):
    """Unpack `(err, *values)`; raise RuntimeFailure naming the call and the error when err is not
    cudaSuccess."""
    err, values = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeFailure(f"CUDA call {what} failed: {describe(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"
    total_memory: int  # bytes


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
    """GPU 0; BackendUnavailable that says why CUDA cannot use one: no GPU, or the CUDA error by name
    with what to install."""
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # noqa: BLE001 - a driver-less machine can fail inside the binding itself
        raise BackendUnavailable(
            f"cuda-python cannot reach the CUDA driver ({type(exc).__name__}: {exc}); install the NVIDIA "
            "driver (nvidia-smi must work)"
        ) from None
    ok = err == cudart.cudaError_t.cudaSuccess
    if ok and int(count) > 0:
        return device_info(cudart, 0)
    if ok or error_name(cudart, err) == "cudaErrorNoDevice":
        raise BackendUnavailable(
            "no NVIDIA GPU is visible to CUDA (cudaGetDeviceCount found none); TensorRT needs one. "
            "Check the driver with nvidia-smi"
        )
    raise BackendUnavailable(f"CUDA cannot use a GPU: cudaGetDeviceCount failed with {describe(cudart, err)}")


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


class PinnedBuffer:
    """Page-locked host memory (cudaMallocHost), seen through numpy views; `free()` releases it.

    A device-to-host cudaMemcpyAsync into pageable memory "will return only once the copy has
    completed" (CUDA Runtime API, API synchronization behavior); into pinned memory it is queued on
    the stream, so every copy of a step overlaps and one synchronize waits for all of them."""

    def __init__(self, cudart, nbytes: int, what: str):
        self.cudart = cudart
        self.nbytes = max(int(nbytes), 1)
        what = f"cudaMallocHost({self.nbytes}) for {what}"
        self.ptr = int(call(cudart, cudart.cudaMallocHost(self.nbytes), what))
        self._bytes = np.frombuffer((ctypes.c_uint8 * self.nbytes).from_address(self.ptr), dtype=np.uint8)

    def view(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """The first bytes as an array of `shape`; valid until `free()`, overwritten by the next copy."""
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if n > self.nbytes:
            raise GenerationError(f"pinned buffer of {self.nbytes} B cannot hold {shape} {np.dtype(dtype)}")
        return self._bytes[:n].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr, self._bytes = self.ptr, 0, None
            call(self.cudart, self.cudart.cudaFreeHost(ptr), "cudaFreeHost")


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
