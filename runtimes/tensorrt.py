"""The `tensorrt` runtime: a bundle's engine for this GPU, KV cache kept in device memory.

Device buffers are allocated once, from the engine's limits, and kept in dicts keyed by tensor
name. Each layer's keys and values have two buffers that swap roles every step:
::
    step n:    past_key_values.i.key <- kv[present.i.key][side]      present.i.key -> kv[...][1 - side]
    step n+1:  side = 1 - side   (the present just written is read as the past, in place)
A contiguous (B, kvh, P+T, hs) present has exactly the layout of the next step's (B, kvh, P', hs)
past, so no copy and no host round trip happens between steps. Only the last position's logits
come back each step, and attention rows only when recording, through pinned host buffers.
Prefill and decode each have their own execution context (runtimes/trt.py says why).

API as in NVIDIA/TensorRT `samples/python/common_runtime.py` (get_tensor_name / get_tensor_mode /
get_tensor_profile_shape, set_tensor_address, execute_async_v3 on a cuda-python stream) and the
Python bindings `python/src/infer/pyCore.cpp` (set_input_shape returns a bool).
"""

from __future__ import annotations

import logging

import numpy as np

from gptdeploy import contract as io
from gptdeploy.bundle import Bundle
from gptdeploy.engines import rebuild_command, select_engine
from gptdeploy.errors import (
    BackendUnavailable,
    BundleError,
    ContextOverflowError,
    GenerationError,
    RuntimeFailure,
)
from gptdeploy.manifest import GraphEntry
from gptdeploy.profiles import PHASES, buffer_shapes
from gptdeploy.runtimes import cuda
from gptdeploy.runtimes.base import RuntimeBase, StepOutput
from gptdeploy.runtimes.trt import import_tensorrt, make_logger, profile_contexts

log = logging.getLogger(__name__)
PREFILL, DECODE = 0, 1  # profile and context index: the position in PHASES


def missing() -> str | None:
    """What this machine lacks for the `tensorrt` backend, or None when it has everything."""
    try:
        import_tensorrt()
        cuda.require_gpu(cuda.load_cudart())
    except BackendUnavailable as exc:
        return str(exc)
    return None


class TensorRTRuntime(RuntimeBase):
    name = "tensorrt"

    def __init__(self, bundle: Bundle, graph: GraphEntry, threads: int | None = None):
        super().__init__(bundle, graph)  # threads: the GPU does the work; accepted for the protocol
        trt = import_tensorrt()
        cudart = cuda.load_cudart()
        device = cuda.require_gpu(cudart)
        # Another GPU or TensorRT release: a BundleError with the rebuild command, before TensorRT
        # is handed a plan it would reject (or crash on).
        self.entry = select_engine(
            bundle.manifest.engines, graph.name, device.compute_capability, trt.__version__, bundle.path
        )
        self.device = device
        self._cudart = cudart
        self._buffers: dict[str, cuda.DeviceBuffer] = {}  # ids, mask, positions, logits, attentions
        self._kv: dict[str, tuple[cuda.DeviceBuffer, cuda.DeviceBuffer]] = {}  # by present name
        self._host: dict[str, cuda.PinnedBuffer] = {}  # pinned landing buffers of device-to-host copies
        self._stream = self._activations = self._engine = self._trt_runtime = None
        self._contexts: list = []  # [prefill, decode]
        try:
            self._load(trt, bundle)
        except BaseException:
            self._release()
            raise

    def _load(self, trt, bundle: Bundle) -> None:
        entry, sig = self.entry, self.graph.signature
        fix = rebuild_command(entry, bundle.path)
        self._logger = make_logger(trt)
        self._trt_runtime = trt.Runtime(self._logger)
        if entry.get("version_compatible"):
            # A version-compatible plan embeds its lean runtime; TensorRT runs that host code only
            # when allowed (IRuntime::setEngineHostCodeAllowed). The manifest hash vouches for it.
            self._trt_runtime.engine_host_code_allowed = True
        plan = bundle.file(entry["file"]).read_bytes()
        self._engine = engine = self._trt_runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BundleError(f"TensorRT cannot load engine {entry['file']} ({self._logger.last()}); {fix}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        want_in, want_out = {s.name for s in sig.inputs()}, {s.name for s in sig.outputs()}
        if inputs != want_in or set(names) - inputs != want_out:
            raise BundleError(
                f"engine {entry['file']} does not have graph {self.graph.name!r}'s inputs and outputs "
                f"(differ: {sorted(set(names) ^ (want_in | want_out))[:4]}); {fix}"
            )
        prefill_max = engine.get_tensor_profile_shape(io.INPUT_IDS, PREFILL)[2]  # (min, opt, max)[2]
        self.max_batch, self.max_context = int(prefill_max[0]), int(prefill_max[1])
        self._dtype = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._stream = cuda.Stream(self._cudart)
        self._contexts, self._activations = profile_contexts(
            trt, engine, self._cudart, self._stream, self._logger, f"lower the limits: {fix}"
        )
        self._allocate()

    def _allocate(self) -> None:
        """Device buffers at the engine's limits, and the pinned host buffer the logits land in."""
        sig = self.graph.signature
        shapes = buffer_shapes(sig, self.max_batch, self.max_context)
        for name in [io.INPUT_IDS, io.ATTENTION_MASK, io.POSITION_IDS, io.LOGITS, *sig.attention_names()]:
            self._buffers[name] = self._alloc(name, shapes[name])
        for present in sig.present_names():
            self._kv[present] = (self._alloc(present, shapes[present]), self._alloc(present, shapes[present]))
        self._past_slot = {past: present for past, present in _layer_pairs(sig)}
        self._side = 0  # kv[...][side] holds the cache: the past of the next step
        nbytes = self.max_batch * sig.vocab_size * self._dtype[io.LOGITS].itemsize  # (B, V): last rows only
        self._host[io.LOGITS] = cuda.PinnedBuffer(self._cudart, nbytes, io.LOGITS)

    def _alloc(self, name: str, shape: tuple[int, ...]) -> cuda.DeviceBuffer:
        return cuda.DeviceBuffer(self._cudart, int(np.prod(shape)) * self._dtype[name].itemsize, name)

    def _pinned(self, name: str, nbytes: int) -> cuda.PinnedBuffer:
        """The pinned buffer for `name`, grown on demand: attention rows reach (B, nh, T, T) only in a
        long prefill, so they are not pinned at the engine's maximum up front."""
        buf = self._host.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.free()
            buf = self._host[name] = cuda.PinnedBuffer(self._cudart, nbytes, name)
        return buf

    # -- steps ----------------------------------------------------------------------------------

    def _prefill(self, input_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        return self._run(PREFILL, input_ids, attention_mask, position_ids, record_attention)

    def _decode(self, next_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        return self._run(DECODE, next_ids, attention_mask, position_ids, record_attention)

    def _run(self, phase: int, ids, mask, pos, record: bool) -> StepOutput:
        B, T = ids.shape
        P = mask.shape[1] - T  # the base class checked mask = (B, P + T)
        self._check_limits(B, P + T)
        ctx, stream = self._contexts[phase], self._stream  # its profile was set once, at load
        host = {io.INPUT_IDS: ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: pos}
        for name, array in host.items():
            host[name] = np.ascontiguousarray(array, dtype=self._dtype[name])  # kept alive until synchronize
            stream.to_device(self._buffers[name].ptr, host[name])
        self._bind(ctx, phase, {name: a.shape for name, a in host.items()}, B, P)
        if not ctx.execute_async_v3(stream.handle):
            self.reset()
            raise RuntimeFailure(
                f"TensorRT failed running {self.entry['file']} ({self._logger.last()})"
            )
        logits = self._last_logits(B, T)
        attentions = self._attentions(B, T, P) if record else None
        stream.synchronize()
        self._side = 1 - self._side  # the presents just written are the next step's pasts
        return StepOutput(
            logits=logits.astype(np.float32),  # a copy: the pinned buffer is reused next step
            attentions=[a.astype(np.float32) for a in attentions] if record else None,
        )

    def _check_limits(self, B: int, positions: int) -> None:
        if B > self.max_batch:
            raise GenerationError(
                f"batch {B} exceeds the engine's {self.max_batch}; "
                f"{rebuild_command(self.entry, self.bundle.path)} with a larger --max-batch"
            )
        if positions > self.max_context:
            raise ContextOverflowError(
                f"{positions} positions exceed the engine's {self.max_context}; rebuild with a "
                f"larger --max-context: {rebuild_command(self.entry, self.bundle.path)}"
            )

    def _bind(self, ctx, phase: int, shapes: dict, B: int, P: int) -> None:
        """Input shapes and every tensor's address for this step; pasts and presents by `side`."""
        sig, side = self.graph.signature, self._side
        shapes.update({past: (B, sig.kv_heads, P, sig.head_dim) for past in self._past_slot})
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise RuntimeFailure(f"TensorRT refused shape {shape} for {name} ({PHASES[phase]} profile)")
        addresses = {name: buf.ptr for name, buf in self._buffers.items()}
        addresses.update({past: self._kv[present][side].ptr for past, present in self._past_slot.items()})
        addresses.update({present: pair[1 - side].ptr for present, pair in self._kv.items()})
        for name, ptr in addresses.items():
            ctx.set_tensor_address(name, ptr)

    def _last_logits(self, B: int, T: int) -> np.ndarray:
        """Queue the copy of row (b, last position) of the (B, T or 1, V) logits for each b into the
        pinned (B, V) buffer; read it after synchronize."""
        V = self.graph.signature.vocab_size
        rows = 1 if self.graph.signature.last_logits_only else T
        dtype = self._dtype[io.LOGITS]
        out = self._host[io.LOGITS].view((B, V), dtype)  # (B, V)
        base = self._buffers[io.LOGITS].ptr
        for b in range(B):
            self._stream.to_host(out[b], base + ((b * rows + rows - 1) * V) * dtype.itemsize)
        return out

    def _attentions(self, B: int, T: int, P: int) -> list[np.ndarray]:
        """Queue the copies of every layer's (B, nh, T, P+T) attention into pinned buffers."""
        sig, out = self.graph.signature, []
        for name in sig.attention_names():
            shape, dtype = (B, sig.n_head, T, P + T), self._dtype[name]
            array = self._pinned(name, int(np.prod(shape)) * dtype.itemsize).view(shape, dtype)
            self._stream.to_host(array, self._buffers[name].ptr)
            out.append(array)
        return out

    def _take_cache(self) -> list[np.ndarray]:
        """The pasts of the next step, kv[present][side]: contiguous (B, kvh, P, hs) at the buffer's start."""
        sig = self.graph.signature
        shape = (self._batch, sig.kv_heads, self.past_length, sig.head_dim)
        out = [np.empty(shape, self._dtype[present]) for present in sig.present_names()]
        for present, array in zip(sig.present_names(), out):
            self._stream.to_host(array, self._kv[present][self._side].ptr)
        self._stream.synchronize()
        return out

    def _put_cache(self, arrays: list[np.ndarray]) -> None:
        B, P = arrays[0].shape[0], arrays[0].shape[2]
        self._check_limits(B, P + 1)  # the next decode step must fit the engine
        sig = self.graph.signature
        names = sig.present_names()
        host = [np.ascontiguousarray(a, dtype=self._dtype[present]) for present, a in zip(names, arrays)]
        for present, array in zip(names, host):
            self._stream.to_device(self._kv[present][self._side].ptr, array)
        self._stream.synchronize()  # the host arrays may go after this

    def _drop_cache(self) -> None:
        self._side = 0  # device buffers stay allocated; the next prefill overwrites them

    def _release(self) -> None:
        try:
            if self._stream is not None:
                self._stream.synchronize()  # no kernel or copy may still use the memory freed below
        finally:
            # Contexts before engine before runtime: TensorRT's destruction order; contexts before
            # the activation memory they were given.
            self._contexts, self._engine, self._trt_runtime = [], None, None
            buffers = [*self._buffers.values(), *(b for pair in self._kv.values() for b in pair)]
            for buf in [*buffers, *self._host.values(), *filter(None, [self._activations])]:
                buf.free()
            self._buffers, self._kv, self._host, self._activations = {}, {}, {}, None
            if self._stream is not None:
                stream, self._stream = self._stream, None
                stream.destroy()


def _layer_pairs(sig) -> list[tuple[str, str]]:
    """(past name, present name) of every layer's key and value, from the contract."""
    return [
        pair
        for i in range(sig.n_layer)
        for pair in ((io.past_key(i), io.present_key(i)), (io.past_value(i), io.present_value(i)))
    ]


def open_runtime(bundle: Bundle, graph: GraphEntry, threads: int | None) -> TensorRTRuntime:
    return TensorRTRuntime(bundle, graph, threads)
