"""The `tensorrt` runtime: a bundle's engine for this GPU, KV cache kept in device memory.

Device buffers are allocated once, from the engine's limits, and kept in dicts keyed by tensor
name. Each layer's keys and values have two buffers that swap roles every step:
::
    step n:    past_key_values.i.key <- kv[present.i.key][side]      present.i.key -> kv[...][1 - side]
    step n+1:  side = 1 - side   (the present just written is read as the past, in place)
A contiguous (B, kvh, P+T, hs) present has exactly the layout of the next step's (B, kvh, P', hs)
past, so no copy and no host round trip happens between steps. Only the last position's logits
come back each step, and attention rows only when recording.

API as in NVIDIA/TensorRT `samples/python/common_runtime.py` (get_tensor_name / get_tensor_mode /
get_tensor_profile_shape, set_tensor_address, execute_async_v3 on a cuda-python stream) and the
Python bindings `python/src/infer/pyCore.cpp` (set_optimization_profile_async(profile_index,
stream_handle) raises on failure; set_input_shape returns a bool).
"""

from __future__ import annotations

import logging

import numpy as np

from gptdeploy import contract as io
from gptdeploy.bundle import Bundle, GraphEntry
from gptdeploy.engines import rebuild_command, select_engine
from gptdeploy.errors import BackendUnavailable, BundleError, ContextOverflowError, GenerationError
from gptdeploy.exporters.tensorrt.builder import import_tensorrt
from gptdeploy.profiles import PHASES, buffer_shapes
from gptdeploy.runtimes import cuda
from gptdeploy.runtimes.base import RuntimeBase, StepOutput

log = logging.getLogger(__name__)


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
        self._stream = self._context = self._engine = None
        try:
            self._load(trt, bundle)
        except BaseException:
            self._release()
            raise

    def _load(self, trt, bundle: Bundle) -> None:
        entry, sig = self.entry, self.graph.signature
        self._trt_runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if entry.get("version_compatible"):
            # A version-compatible plan embeds its lean runtime; TensorRT runs that host code only
            # when allowed (IRuntime::setEngineHostCodeAllowed). The manifest hash vouches for it.
            self._trt_runtime.engine_host_code_allowed = True
        engine = self._trt_runtime.deserialize_cuda_engine(bundle.file(entry["file"]).read_bytes())
        if engine is None:
            raise BundleError(
                f"TensorRT cannot load engine {entry['file']}; {rebuild_command(entry, bundle.path)}"
            )
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        want_in, want_out = {s.name for s in sig.inputs()}, {s.name for s in sig.outputs()}
        if inputs != want_in or set(names) - inputs != want_out:
            raise BundleError(
                f"engine {entry['file']} does not have graph {self.graph.name!r}'s inputs and outputs "
                f"(differ: {sorted(set(names) ^ (want_in | want_out))[:4]}); "
                f"{rebuild_command(entry, bundle.path)}"
            )
        prefill_max = engine.get_tensor_profile_shape(io.INPUT_IDS, 0)[2]  # (min, opt, max)[2]
        self.max_batch, self.max_context = int(prefill_max[0]), int(prefill_max[1])
        self._dtype = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._context = engine.create_execution_context()
        self._stream = cuda.Stream(self._cudart)
        shapes = buffer_shapes(sig, self.max_batch, self.max_context)
        for name in [io.INPUT_IDS, io.ATTENTION_MASK, io.POSITION_IDS, io.LOGITS, *sig.attention_names()]:
            self._buffers[name] = self._alloc(name, shapes[name])
        for present in sig.present_names():
            self._kv[present] = (self._alloc(present, shapes[present]), self._alloc(present, shapes[present]))
        self._past_slot = {past: present for past, present in _layer_pairs(sig)}
        self._side = 0  # kv[...][side] holds the cache: the past of the next step
        self._profile: int | None = None

    def _alloc(self, name: str, shape: tuple[int, ...]) -> cuda.DeviceBuffer:
        return cuda.DeviceBuffer(self._cudart, int(np.prod(shape)) * self._dtype[name].itemsize, name)

    # -- steps ----------------------------------------------------------------------------------

    def _prefill(self, input_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        return self._run(0, input_ids, attention_mask, position_ids, record_attention)

    def _decode(self, next_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        return self._run(1, next_ids, attention_mask, position_ids, record_attention)

    def _run(self, profile: int, ids, mask, pos, record: bool) -> StepOutput:
        sig, ctx, stream = self.graph.signature, self._context, self._stream
        B, T = ids.shape
        P = mask.shape[1] - T  # the base class checked mask = (B, P + T)
        if B > self.max_batch:
            raise GenerationError(
                f"batch {B} exceeds the engine's {self.max_batch}; "
                f"{rebuild_command(self.entry, self.bundle.path)} with a larger --max-batch"
            )
        if P + T > self.max_context:
            raise ContextOverflowError(
                f"{P + T} positions exceed the engine's {self.max_context}; rebuild with a "
                f"larger --max-context: {rebuild_command(self.entry, self.bundle.path)}"
            )
        if self._profile != profile:  # 0 prefill, 1 decode; switching invalidates the shapes set before
            try:
                ctx.set_optimization_profile_async(profile, stream.handle)  # raises RuntimeError on failure
            except RuntimeError as exc:
                raise GenerationError(f"TensorRT refused optimization profile {profile}: {exc}") from None
            self._profile = profile
        host = {io.INPUT_IDS: ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: pos}
        shapes = {name: a.shape for name, a in host.items()}
        shapes.update({past: (B, sig.kv_heads, P, sig.head_dim) for past in self._past_slot})
        for name, array in host.items():
            host[name] = np.ascontiguousarray(array, dtype=self._dtype[name])  # kept alive until synchronize
            stream.to_device(self._buffers[name].ptr, host[name])
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise GenerationError(
                    f"TensorRT refused shape {shape} for {name} in the {PHASES[profile]} profile"
                )
        side = self._side
        addresses = {name: buf.ptr for name, buf in self._buffers.items()}
        addresses.update({past: self._kv[present][side].ptr for past, present in self._past_slot.items()})
        addresses.update({present: pair[1 - side].ptr for present, pair in self._kv.items()})
        for name, ptr in addresses.items():
            ctx.set_tensor_address(name, ptr)
        if not ctx.execute_async_v3(stream.handle):
            self.reset()
            raise GenerationError(f"TensorRT failed running {self.entry['file']} (see the TensorRT log)")
        logits = self._last_logits(B, T)
        attentions = None
        if record:  # (B, nh, T, P+T) per layer, copied only when asked for
            attentions = [
                np.empty((B, sig.n_head, T, P + T), dtype=self._dtype[n]) for n in sig.attention_names()
            ]
            for name, array in zip(sig.attention_names(), attentions):
                stream.to_host(array, self._buffers[name].ptr)
        stream.synchronize()
        self._side = 1 - side  # the presents just written are the next step's pasts
        return StepOutput(
            logits=logits.astype(np.float32, copy=False),
            attentions=[a.astype(np.float32, copy=False) for a in attentions] if record else None,
        )

    def _last_logits(self, B: int, T: int) -> np.ndarray:
        """Copy row (b, last position) of the (B, T or 1, V) logits for each b: B small copies."""
        V = self.graph.signature.vocab_size
        rows = 1 if self.graph.signature.last_logits_only else T
        dtype = self._dtype[io.LOGITS]
        out = np.empty((B, V), dtype=dtype)  # (B, V)
        base = self._buffers[io.LOGITS].ptr
        for b in range(B):
            self._stream.to_host(out[b], base + ((b * rows + rows - 1) * V) * dtype.itemsize)
        return out

    def _drop_cache(self) -> None:
        self._side = 0  # device buffers stay allocated; the next prefill overwrites them

    def _release(self) -> None:
        try:
            if self._stream is not None:
                self._stream.synchronize()  # no kernel may still use the buffers freed below
        finally:
            # Context before engine before runtime: TensorRT's destruction order.
            self._context = self._engine = self._trt_runtime = None
            for buf in [*self._buffers.values(), *(b for pair in self._kv.values() for b in pair)]:
                buf.free()
            self._buffers, self._kv = {}, {}
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
