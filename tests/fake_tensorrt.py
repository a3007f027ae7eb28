"""CPU stand-ins for `tensorrt` and cuda-python's cudart, strict about the API rules the real ones
enforce, so the engine builder and the `tensorrt` runtime run end to end without a GPU.

They implement only the calls gptdeploy makes, with the names and signatures of the TensorRT 10
Python bindings and cuda-python (see the citations in exporters/tensorrt/builder.py and
runtimes/tensorrt.py). The "engine" a fake build serializes is JSON naming the ONNX graph; the
fake execution context runs that graph with onnxruntime on the CPU, reading inputs from and
writing outputs to the fake device memory at the addresses the runtime bound. It refuses what
TensorRT refuses: shapes outside the active profile, unbound tensors, outputs overlapping inputs
(which would break the KV ping-pong), buffers too small for the shapes set.
"""

from __future__ import annotations

import ctypes
import json
import sys
import types
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------- cudart


class FakeCudart(types.ModuleType):
    """cuda.bindings.runtime: every call returns (cudaError_t, *values)."""

    class cudaError_t:
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, devices: int = 1, cc: tuple[int, int] = (9, 0), name: bytes = b"Fake H100"):
        super().__init__("cuda.bindings.runtime")
        self.devices, self.cc, self.gpu_name = devices, cc, name
        self.memory: dict[int, np.ndarray] = {}  # base address -> bytes
        self._next = 1 << 32
        self.streams: set[str] = set()

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorFake%d" % int(err)

    def cudaGetDeviceCount(self):
        return (0, self.devices) if self.devices else (100, 0)  # 100: cudaErrorNoDevice

    def cudaGetDeviceProperties(self, i):
        return 0, types.SimpleNamespace(
            name=self.gpu_name, major=self.cc[0], minor=self.cc[1], totalGlobalMem=80 << 30
        )

    def cudaDriverGetVersion(self):
        return 0, 12040

    def cudaMalloc(self, n):
        base, self._next = self._next, self._next + ((n + 4095) // 4096 + 1) * 4096
        self.memory[base] = np.zeros(n, dtype=np.uint8)
        return 0, base

    def cudaFree(self, ptr):
        if ptr not in self.memory:
            return (1,)  # cudaErrorInvalidValue
        del self.memory[ptr]
        return (0,)

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
            ctypes.memmove(dst, self.view(src, n).tobytes(), n)
        return (0,)


def install_cudart(monkeypatch, cudart: FakeCudart) -> None:
    for name in ("cuda", "cuda.bindings"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)


# -------------------------------------------------------------------------------- tensorrt


def make_tensorrt(cudart: FakeCudart, version: str = "10.13.0.35", parser_errors: list[str] | None = None):
    """A fake `tensorrt` module sharing `cudart`'s device memory."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.built: list[dict] = []  # every config that reached build_serialized_network

    class ILogger:
        def __init__(self):
            pass

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, severity=2):
            self.severity = severity

    trt.ILogger, trt.Logger = ILogger, Logger
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", VERSION_COMPATIBLE="VERSION_COMPATIBLE")
    trt.HardwareCompatibilityLevel = types.SimpleNamespace(NONE="NONE", AMPERE_PLUS="AMPERE_PLUS")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = lambda dtype: dtype  # the fake engine's dtypes are numpy types already

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class Cache:
        def __init__(self, blob: bytes):
            self.entries = json.loads(blob) if blob else []

        def serialize(self):
            return json.dumps(self.entries).encode()

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
            return Cache(bytes(blob))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Network:
        def __init__(self, flags):
            assert flags == 1 << 1, f"expected only the STRONGLY_TYPED bit (1 << 1), got {flags}"
            self.graph = None

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
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            config.cache.entries.append(f"tactics for {Path(network.graph).name}")
            trt.built.append(
                {
                    "flags": sorted(config.flags),
                    "pool": config.pool,
                    "hw": config.hardware_compatibility_level,
                }
            )
            return json.dumps({"graph": network.graph, "profiles": config.profiles}).encode()

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            try:
                plan = json.loads(bytes(data))
            except ValueError:
                return None
            return Engine(plan)

    class Engine:
        def __init__(self, plan):
            import onnxruntime as ort

            self.session = ort.InferenceSession(plan["graph"], providers=["CPUExecutionProvider"])
            self.profiles = plan["profiles"]
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

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}
            self.profile_switches = 0

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
            assert set(self.shapes) == set(e.inputs), f"shapes not set for {set(e.inputs) - set(self.shapes)}"
            assert set(self.addresses) == set(e.names), f"unbound: {set(e.names) - set(self.addresses)}"
            feeds, spans = {}, []
            for name, dtype in e.inputs.items():
                n = int(np.prod(self.shapes[name])) * np.dtype(dtype).itemsize
                feeds[name] = (
                    cudart.view(self.addresses[name], n).view(dtype).reshape(self.shapes[name]).copy()
                )
                spans.append((self.addresses[name], n, name))
            results = e.session.run(list(e.outputs), feeds)
            for name, value in zip(e.outputs, results):
                value = np.ascontiguousarray(value, dtype=e.outputs[name])
                start = self.addresses[name]
                for a, n, other in spans:
                    if value.nbytes and n and start < a + n and a < start + value.nbytes:
                        raise AssertionError(f"output {name} overlaps input {other}")
                cudart.view(start, value.nbytes)[:] = value.view(np.uint8).reshape(-1)
            return True

    def _np(onnx_type: str):
        return {
            "tensor(int64)": np.int64,
            "tensor(float)": np.float32,
            "tensor(float16)": np.float16,
            "tensor(int32)": np.int32,
        }[onnx_type]

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt
