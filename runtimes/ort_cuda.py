"""The `ort-cuda` runtime: onnxruntime's CUDA execution provider, KV cache in device memory.

Same ping-pong as the `tensorrt` runtime: per layer two device buffers, sized once for the
model's context, bound by pointer through IOBinding (`bind_input` / `bind_output` with
`buffer_ptr`): this step's presents are written into the buffer the next step reads as its
pasts, so the cache never leaves the GPU and onnxruntime allocates nothing per step for it.
Only the logits (and attention rows when recording) are bound to the host.

TensorrtExecutionProvider goes first only when asked for (`tensorrt_ep=True`): without explicit
profiles (`trt_profile_min_shapes` / `_opt_` / `_max_`, onnxruntime PR #15546) that provider rebuilds
its engine whenever an input outgrows the shapes seen so far, which a growing KV cache does on
every decode step. gptdeploy's TensorRT path is the `tensorrt` backend. `device="cpu"` runs the
same binding logic on the CPU provider; the tests use it to check the ping-pong without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from io import StringIO

import numpy as np
import onnxruntime as ort

from gptdeploy import contract as io
from gptdeploy.bundle import Bundle
from gptdeploy.errors import BackendUnavailable, BundleError, ContextOverflowError, RuntimeFailure
from gptdeploy.manifest import GraphEntry
from gptdeploy.runtimes.base import RuntimeBase, StepOutput

log = logging.getLogger(__name__)

INSTALL = (
    "pip install 'gptdeploy[gpu]' (onnxruntime-gpu replaces onnxruntime: pip uninstall onnxruntime first)"
)
CUDA_EP, TRT_EP = "CUDAExecutionProvider", "TensorrtExecutionProvider"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # onnxruntime colours its log lines on a terminal
REQUIREMENTS = "onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements"
# What the loader says about the first missing library, as onnxruntime logs it (provider_bridge_ort.cc
# "Failed to load library libonnxruntime_providers_cuda.so with error: ..."): dlerror on Linux,
# LoadLibrary's dependency message on Windows.
MISSING_LIBRARY = re.compile(
    r"([\w.+-]+\.so[\w.]*): cannot open shared object file|depends on \"([^\"]+)\" which is missing"
)


def missing() -> str | None:
    have = ort.get_available_providers()
    if CUDA_EP not in have:
        return f"onnxruntime has no {CUDA_EP} (available: {', '.join(have)}); {INSTALL}"
    return None


def providers(device: str, device_id: int, tensorrt_ep: bool) -> list:
    """Providers in priority order; explicit, so onnxruntime never picks or warns on its own."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    have = ort.get_available_providers()
    chosen: list = []
    if tensorrt_ep and TRT_EP in have:
        chosen.append((TRT_EP, {"device_id": device_id}))
    return chosen + [(CUDA_EP, {"device_id": device_id}), "CPUExecutionProvider"]


def _open_session(path, name: str, so, device: str, device_id: int, tensorrt_ep: bool):
    """The InferenceSession, refused (BackendUnavailable) when asked for CUDA but made on the CPU."""
    chosen = providers(device, device_id, tensorrt_ep)
    with _onnxruntime_log() if device == "cuda" else contextlib.nullcontext([]) as log_lines:
        try:
            session = ort.InferenceSession(str(path), so, providers=chosen)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BundleError(
                f"onnxruntime cannot load graph {name!r} on {device}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            ) from None
    session.disable_fallback()  # a later provider failure raises instead of re-running on the CPU
    if device == "cuda" and CUDA_EP not in session.get_providers():
        raise BackendUnavailable(f"backend 'ort-cuda' is unavailable: {_cpu_fallback_reason(log_lines)}")
    return session


@contextlib.contextmanager
def _onnxruntime_log():
    """The lines onnxruntime writes while a session is made: its C++ log (file descriptor 2, a
    CLogSink flushed per message) and its Python fallback notice (`print`, onnxruntime_inference_
    collection.py). Both are passed on to where they were going once the session exists."""
    lines: list[str] = []
    printed = StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as native:
        os.dup2(native.fileno(), 2)
        try:
            with contextlib.redirect_stdout(printed):
                yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            native.seek(0)
            logged = native.read().decode(errors="replace")
            sys.stderr.write(logged)
            sys.stdout.write(printed.getvalue())
            lines += logged.splitlines() + printed.getvalue().splitlines()


def _cpu_fallback_reason(log_lines: list[str]) -> str:
    """One line: onnxruntime made the session without CUDAExecutionProvider, which it does with only a
    warning when the CUDA or cuDNN libraries fail to load (onnxruntime_pybind_state.cc: "Failed to
    create CUDAExecutionProvider"); the missing library by name when its log gives one."""
    text = " ".join(log_lines)
    found = MISSING_LIBRARY.search(text)
    if found:
        library = next(g for g in found.groups() if g)
        return (
            f"onnxruntime could not load {library} for {CUDA_EP} and made the session on the CPU; install "
            f"the CUDA/cuDNN release this onnxruntime-gpu was built for ({REQUIREMENTS}) where the loader "
            "finds it (LD_LIBRARY_PATH, or onnxruntime.preload_dlls() for NVIDIA's pip wheels)"
        )
    said = [ANSI.sub("", line).strip() for line in log_lines if CUDA_EP in line or "EP Error" in line]
    return (
        f"onnxruntime made the session on the CPU: {CUDA_EP} did not start"
        + (f" ({said[-1][:200]})" if said else "")
        + "; its CUDA/cuDNN libraries failed to load or the driver is too old for them. Check with "
        "nvidia-smi and python -c \"import onnxruntime as o; o.set_default_logger_severity(0); "
        "o.InferenceSession('model.onnx', providers=['CUDAExecutionProvider'])\""
    )


class OrtCudaRuntime(RuntimeBase):
    name = "ort-cuda"

    def __init__(
        self,
        bundle: Bundle,
        graph: GraphEntry,
        threads: int | None = None,
        *,
        device: str = "cuda",
        device_id: int = 0,
        tensorrt_ep: bool = False,
    ):
        super().__init__(bundle, graph)
        if device == "cuda" and (problem := missing()):
            raise BackendUnavailable(f"backend 'ort-cuda' is unavailable: {problem}")
        if device == "cuda" and bundle is not None and (kind := bundle.manifest.cpu_graph(graph)):
            # Its com.microsoft ops have fp32 / quantized kernels on the CPU only: onnxruntime would
            # place them there and copy every layer's activations across. `auto` goes on to `ort`.
            raise BackendUnavailable(
                f"graph {graph.name!r} is {kind} for onnxruntime on CPUs, not for its CUDA provider; run it "
                "with --backend ort, or export with --fp16 (or --portable for fp32) for the GPU"
            )
        self.device, self.device_id = device, device_id
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads  # CPU-side ops (shape arithmetic) only
        self._session = _open_session(bundle.file(graph.file), graph.file, so, device, device_id, tensorrt_ep)
        sig = graph.signature
        have = {i.name for i in self._session.get_inputs()} | {o.name for o in self._session.get_outputs()}
        want = {s.name for s in [*sig.inputs(), *sig.outputs()]}
        if have != want:
            raise BundleError(
                f"graph {graph.file!r} does not match its manifest entry "
                f"(differ: {sorted(have ^ want)[:4]}); re-export the bundle"
            )
        self._kv_dtype = np.dtype(sig.kv_dtype)
        self._pairs = [(io.past_key(i), io.present_key(i)) for i in range(sig.n_layer)] + [
            (io.past_value(i), io.present_value(i)) for i in range(sig.n_layer)
        ]
        self._kv: dict[str, tuple[ort.OrtValue, ort.OrtValue]] = {}  # present name -> two device buffers
        self._capacity = 0  # batch rows the KV buffers hold
        self._side = 0
        self._binding = self._session.io_binding()

    def _ensure_kv(self, B: int) -> None:
        """Allocate (once per larger batch) two (B, kvh, max_context, hs) buffers per present."""
        if B <= self._capacity:
            return
        sig = self.graph.signature
        n = B * sig.kv_heads * self.max_context * sig.head_dim
        self._kv = {
            present: tuple(
                ort.OrtValue.ortvalue_from_shape_and_type(
                    [n], self._kv_dtype.type, self.device, self.device_id
                )
                for _ in range(2)
            )
            for _, present in self._pairs
        }
        self._capacity = B

    def _prefill(self, input_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        self._ensure_kv(input_ids.shape[0])
        return self._run(input_ids, attention_mask, position_ids, record_attention)

    def _decode(self, next_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        return self._run(next_ids, attention_mask, position_ids, record_attention)

    def _run(self, ids, mask, pos, record: bool) -> StepOutput:
        sig, b = self.graph.signature, self._binding
        B, T = ids.shape
        P = mask.shape[1] - T
        if P + T > self.max_context:
            raise ContextOverflowError(f"{P + T} positions exceed the model's {self.max_context}")
        for name, array in ((io.INPUT_IDS, ids), (io.ATTENTION_MASK, mask), (io.POSITION_IDS, pos)):
            b.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        side, dev, dtype = self._side, (self.device, self.device_id), self._kv_dtype.type
        past_shape, present_shape = [B, sig.kv_heads, P, sig.head_dim], [B, sig.kv_heads, P + T, sig.head_dim]
        b.clear_binding_outputs()
        b.bind_output(io.LOGITS, "cpu")  # onnxruntime copies only this (and attentions) to the host
        for past, present in self._pairs:
            b.bind_input(past, *dev, dtype, past_shape, self._kv[present][side].data_ptr())
            b.bind_output(present, *dev, dtype, present_shape, self._kv[present][1 - side].data_ptr())
        if record:
            for name in sig.attention_names():
                b.bind_output(name, "cpu")
        try:
            self._session.run_with_iobinding(b)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            self.reset()
            raise RuntimeFailure(f"onnxruntime ({self.device}) failed: {str(exc).strip()[:300]}") from None
        outs = b.get_outputs()  # binding order: logits, presents, attentions
        self._side = 1 - side  # the presents just written are the next step's pasts
        logits = outs[0].numpy()  # (B, T or 1, V)
        attentions = (
            [o.numpy().astype(np.float32, copy=False) for o in outs[1 + len(self._pairs) :]]
            if record
            else None
        )
        return StepOutput(
            logits=np.ascontiguousarray(logits[:, -1, :], dtype=np.float32), attentions=attentions
        )

    def _take_cache(self) -> list[np.ndarray]:
        # OrtValue.numpy() copies a whole (capacity) buffer from the GPU: a cost paid at the batching
        # engine's join/leave events only, never per step. On the CPU it is a view of the buffer the
        # next prefill overwrites, hence the copy.
        shape = self._cache_shape(self._batch, self.past_length)
        n = int(np.prod(shape))
        return [self._kv[present][self._side].numpy()[:n].reshape(shape).copy()
                for present in self.graph.signature.present_names()]

    def _put_cache(self, arrays: list[np.ndarray]) -> None:
        B, P = arrays[0].shape[0], arrays[0].shape[2]
        if P + 1 > self.max_context:
            raise ContextOverflowError(f"{P + 1} positions exceed the model's {self.max_context}")
        self._ensure_kv(B)
        for present, array in zip(self.graph.signature.present_names(), arrays):
            buffer = self._kv[present][self._side]
            flat = np.zeros(buffer.shape(), dtype=self._kv_dtype)  # update_inplace takes the whole buffer
            flat[: array.size] = array.ravel()
            buffer.update_inplace(flat)  # host -> device copy into the same allocation

    def _cache_shape(self, B: int, P: int) -> tuple[int, int, int, int]:
        sig = self.graph.signature
        return (B, sig.kv_heads, P, sig.head_dim)

    def _drop_cache(self) -> None:
        self._side = 0  # buffers stay allocated; the next prefill overwrites them
        if getattr(self, "_binding", None) is not None:
            self._binding.clear_binding_inputs()
            self._binding.clear_binding_outputs()

    def _release(self) -> None:
        self._kv, self._capacity = {}, 0
        self._binding = None
        self._session = None


def open_runtime(bundle: Bundle, graph: GraphEntry, threads: int | None) -> OrtCudaRuntime:
    return OrtCudaRuntime(bundle, graph, threads)
