"""CPU stand-ins for `tensorrt` and cuda-python's cudart, strict about the API rules the real ones
enforce, so the engine builder and the `tensorrt` runtime run end to end without a GPU.

They implement only the calls gptdeploy makes, with the names and signatures of the TensorRT 10
Python bindings and cuda-python (see the citations in exporters/tensorrt/builder.py, runtimes/trt.py
and runtimes/tensorrt.py). The "engine" a fake build serializes is JSON naming the ONNX graph; a
fake execution context runs that graph with onnxruntime on the CPU, reading inputs from and writing
outputs to the fake device memory at the addresses the runtime bound. It refuses what TensorRT
refuses: shapes outside its profile, unbound tensors, outputs overlapping inputs (which would break
the KV ping-pong), a user-managed context without its activation memory.
"""

from __future__ import annotations

import ctypes
import json
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import numpy as np

# cudaError_t values and names (driver_types.h) that the fakes return
ERRORS = {0: "cudaSuccess", 1: "cudaErrorInvalidValue", 2: "cudaErrorMemoryAllocation",
          35: "cudaErrorInsufficientDriver", 100: "cudaErrorNoDevice", 400: "cudaErrorInvalidResourceHandle"}


class FakeCudart(types.ModuleType):
    """cuda.bindings.runtime: every call returns (cudaError_t, *values). `device_error` is what
    cudaGetDeviceCount fails with (35: cuda-python 13 on a CUDA 12 driver)."""

    class cudaError_t:
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, devices=1, cc=(9, 0), name=b"Fake H100", device_error: int | None = None):
        super().__init__("cuda.bindings.runtime")
        self.__spec__ = ModuleSpec(self.__name__, None)  # importlib.util.find_spec (torch._dynamo) needs one
        self.devices, self.cc, self.gpu_name, self.device_error = devices, cc, name, device_error
        self.memory: dict[int, np.ndarray] = {}  # device: base address -> bytes
        self.pinned: dict[int, ctypes.Array] = {}  # page-locked host: address -> buffer
        self.pageable_copies = 0  # device-to-host copies into memory cudaMallocHost did not give
        self._next = 1 << 32
        self.streams: set[str] = set()

    def cudaGetErrorName(self, err):
        return 0, ERRORS.get(int(err), f"cudaErrorUnknown{int(err)}").encode()

    def cudaGetDeviceCount(self):
        if self.device_error is not None:
            return self.device_error, 0
        return (0, self.devices) if self.devices else (100, 0)  # 100: cudaErrorNoDevice

    def cudaGetDeviceProperties(self, i):
        prop = types.SimpleNamespace(name=self.gpu_name, major=self.cc[0], minor=self.cc[1])
        prop.totalGlobalMem = 80 << 30
        return 0, prop

    def cudaDriverGetVersion(self):
        return 0, 12040

    def cudaMalloc(self, n):
        base, self._next = self._next, self._next + ((n + 4095) // 4096 + 1) * 4096
        self.memory[base] = np.zeros(n, dtype=np.uint8)
        return 0, base

    def cudaFree(self, ptr):
        return (0,) if self.memory.pop(ptr, None) is not None else (1,)

    def cudaMallocHost(self, n):
        buf = (ctypes.c_uint8 * n)()
        self.pinned[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFreeHost(self, ptr):
        return (0,) if self.pinned.pop(ptr, None) is not None else (1,)

    def cudaStreamCreate(self):
        handle = f"stream-{len(self.streams)}"
        self.streams.add(handle)
        return 0, handle

    def cudaStreamSynchronize(self, s):
        return (0,) if s in self.streams else (400,)

    def cudaStreamDestroy(self, s):
        self.streams.discard(s)
        return (0,)

    def view(self, addr: int, nbytes: int) -> np.ndarray:
        """The device bytes [addr, addr + nbytes); raises if they leave one allocation."""
        for base, mem in self.memory.items():
            if base <= addr and addr + nbytes <= base + mem.size:
                return mem[addr - base : addr - base + nbytes]
        raise AssertionError(f"device access {addr:#x}+{nbytes} outside every allocation")

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        assert stream in self.streams, "copy on a destroyed stream"
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.view(dst, n)[:] = np.frombuffer(ctypes.string_at(src, n), dtype=np.uint8)
        else:
            pinned = any(a <= dst and dst + n <= a + ctypes.sizeof(b) for a, b in self.pinned.items())
            self.pageable_copies += not pinned
            ctypes.memmove(dst, self.view(src, n).tobytes(), n)
        return (0,)


def install_cudart(monkeypatch, cudart: FakeCudart) -> None:
    for name in ("cuda", "cuda.bindings"):
        module = types.ModuleType(name)
        module.__spec__ = ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)


# -------------------------------------------------------------------------------- tensorrt


def make_tensorrt(cudart: FakeCudart, version="10.13.0.35", parser_errors=None, context_fails=False):
    """A fake `tensorrt` module sharing `cudart`'s device memory. `context_fails`: engines return None
    from create_execution_context, as TensorRT does without the device memory a context needs."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__, trt.__version__ = ModuleSpec("tensorrt", None), version
    trt.built: list[dict] = []  # every config that reached build_serialized_network

    class ILogger:
        def __init__(self):
            pass

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    trt.ILogger, trt.Logger = ILogger, Logger
    ns = types.SimpleNamespace
    trt.NetworkDefinitionCreationFlag = ns(STRONGLY_TYPED=1)
    trt.MemoryPoolType = ns(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = ns(TF32="TF32", VERSION_COMPATIBLE="VERSION_COMPATIBLE")
    trt.HardwareCompatibilityLevel = ns(NONE="NONE", AMPERE_PLUS="AMPERE_PLUS")
    trt.TensorIOMode = ns(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.ExecutionContextAllocationStrategy = ns(STATIC=0, ON_PROFILE_CHANGE=1, USER_MANAGED=2)
    trt.nptype = lambda dtype: dtype  # the fake engine's dtypes are numpy types already

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):  # pyCore.cpp: RuntimeError when setDimensions fails
            if not len(lo) == len(opt) == len(hi) or not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    def cache(blob: bytes):
        entries = json.loads(blob) if blob else []
        return ns(entries=entries, serialize=lambda: json.dumps(entries).encode())

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache = {"TF32"}, [], None
            self.pool, self.hardware_compatibility_level = {}, "NONE"

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)
            return len(self.profiles) - 1

        def create_timing_cache(self, blob):
            return cache(bytes(blob))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Parser:
        def __init__(self, network, logger):
            self.network, self.errors = network, list(parser_errors or [])

        def parse_from_file(self, path):
            self.network.graph = path
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return f"In node {i} (parse): UNSUPPORTED_NODE: {self.errors[i]}"

    class Builder:
        def __init__(self, logger):
            assert isinstance(logger, ILogger)

        def create_network(self, flags):
            assert flags == 1 << 1, f"expected only the STRONGLY_TYPED bit (1 << 1), got {flags}"
            return ns(graph=None)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            config.cache.entries.append(f"tactics for {Path(network.graph).name}")
            hw = config.hardware_compatibility_level
            trt.built.append({"flags": sorted(config.flags), "pool": config.pool, "hw": hw})
            return json.dumps({"graph": network.graph, "profiles": config.profiles}).encode()

    class Runtime:
        def __init__(self, logger):
            self.logger, self.engine_host_code_allowed = logger, False

        def deserialize_cuda_engine(self, data):
            try:
                plan = json.loads(bytes(data))
            except ValueError:
                self.logger.log(Logger.ERROR, "Serialization assertion magicTagRead == kMAGIC_TAG failed")
                return None
            return Engine(plan)

    class Engine:
        device_memory_size_v2 = 1 << 16  # activations, the largest over the profiles

        def __init__(self, plan):
            import onnxruntime as ort

            self.session = ort.InferenceSession(plan["graph"], providers=["CPUExecutionProvider"])
            self.profiles, self.contexts = plan["profiles"], []
            self.inputs = {i.name: _np(i.type) for i in self.session.get_inputs()}
            self.outputs = {o.name: _np(o.type) for o in self.session.get_outputs()}
            self.names = [*self.inputs, *self.outputs]

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.inputs else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return {**self.inputs, **self.outputs}[name]

        def get_tensor_profile_shape(self, name, profile_index):
            return [tuple(s) for s in self.profiles[profile_index][name]]

        def create_execution_context(self, strategy=0):
            if context_fails:
                return None
            self.contexts.append(Context(self, strategy))
            return self.contexts[-1]

    class Context:
        def __init__(self, engine, strategy):
            self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}
            self.strategy, self.memory, self.profile_switches = strategy, None, 0

        active_optimization_profile = property(lambda self: self.profile)

        def set_device_memory(self, ptr, size):
            assert size >= self.engine.device_memory_size_v2 and cudart.view(ptr, size) is not None
            self.memory = (ptr, size)

        def set_optimization_profile_async(self, index, stream):
            assert stream in cudart.streams
            self.profile, self.shapes = index, {}  # switching invalidates the input shapes
            self.profile_switches += 1
            return True

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.profiles[self.profile][name]
            ok = len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
            if ok:
                self.shapes[name] = tuple(int(s) for s in shape)
            return ok

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream_handle):
            e = self.engine
            assert stream_handle in cudart.streams
            assert self.strategy != 2 or self.memory, "user-managed context without activation memory"
            assert set(self.shapes) == set(e.inputs), f"shapes not set for {set(e.inputs) - set(self.shapes)}"
            assert set(self.addresses) == set(e.names), f"unbound: {set(e.names) - set(self.addresses)}"
            feeds, spans = {}, []
            for name, dtype in e.inputs.items():
                n = int(np.prod(self.shapes[name])) * np.dtype(dtype).itemsize
                raw = cudart.view(self.addresses[name], n)
                feeds[name] = raw.view(dtype).reshape(self.shapes[name]).copy()
                spans.append((self.addresses[name], n, name))
            for name, value in zip(e.outputs, e.session.run(list(e.outputs), feeds)):
                value = np.ascontiguousarray(value, dtype=e.outputs[name])
                start = self.addresses[name]
                for a, n, other in spans:
                    if value.nbytes and n and start < a + n and a < start + value.nbytes:
                        raise AssertionError(f"output {name} overlaps input {other}")
                cudart.view(start, value.nbytes)[:] = value.view(np.uint8).reshape(-1)
            return True

    def _np(onnx_type: str):
        kinds = {"int64": np.int64, "float": np.float32, "float16": np.float16, "int32": np.int32}
        return kinds[onnx_type.removeprefix("tensor(").removesuffix(")")]

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt
