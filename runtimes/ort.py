"""The `ort` runtime: onnxruntime on the CPU, KV cache kept as OrtValues through IOBinding.

The cache never round-trips through numpy (a bare `sess.run` loop turns every layer's keys and
values into numpy arrays and back each token): a graph that can write it in place gets one
shared buffer per past/present pair, any other graph gets its presents bound back as pasts.
Only the logits of the last position come back to the host, and attention outputs are bound at
all only while recording. Needs numpy and onnxruntime only (no `onnx` package).
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import _pybind_state as C  # the layer onnxruntime's own Python classes wrap

from gptdeploy import contract as io
from gptdeploy.bundle import Bundle
from gptdeploy.config import GPTConfig
from gptdeploy.errors import BundleError, RuntimeFailure
from gptdeploy.machine import physical_cores
from gptdeploy.manifest import GraphEntry
from gptdeploy.runtimes.base import RuntimeBase, StepOutput
from gptdeploy.runtimes.kv_buffer import KVBuffers
from gptdeploy.runtimes.ort_session import ORT_ERRORS, needs_tiled_attention, open_session, session_options

log = logging.getLogger(__name__)

# Longer prompts are prefilled in chunks of this many positions, each attending to the cache the
# chunks before it wrote. onnxruntime's CPU attention computes every (query, key) score of a call,
# masked ones included, so one call over T positions scores T x T pairs and chunks of C score about
# T x (T + C) / 2; the Linear layers keep rows enough to run at full speed. Prefill 512 on the
# SmolLM-135M shape, fp32: 473 ms whole, 428 ms in chunks of 256, 455 ms of 128, 543 ms of 64;
# prompt 1536: 1900 -> 1518 ms (256); int8 228 -> 188 ms (docs/performance.md). The probabilities
# buffer of a call shrinks the same way (B x heads x C x T floats instead of T x T).
PREFILL_CHUNK = 256


def tiled_attention(config: GPTConfig, prefill_chunk: int | None = PREFILL_CHUNK) -> bool:
    """Whether the runtime, prefilling `prefill_chunk` positions a call, runs `config`'s model on
    onnxruntime's tiled attention kernel unless told otherwise (runtimes/ort_session.py); export's
    checks and the sample benchmarks open their sessions with the same choice."""
    return needs_tiled_attention(config.n_head, config.block_size, prefill_chunk)


class OrtRuntime(RuntimeBase):
    """One InferenceSession and its KV cache, in one of two modes:

    - shared buffer (graphs whose manifest entry says `kv_shared_buffer`): one buffer per
      past/present pair with spare capacity (runtimes/kv_buffer.py), bound once as both input and
      output; the attention op writes only the new positions, and a step binds only the ids,
      mask, positions and logits. Logits are bit-identical to the copying mode (tests/test_kv_inplace.py).
    - copying (every other graph, the contract as written): each step binds the previous step's
      `present.*` OrtValues as this step's `past_key_values.*`, and the graph copies past + new
      into new presents.

    The hot path calls onnxruntime's C-level binding (`C.SessionIOBinding`, the object the
    public `IOBinding` wraps) directly: the wrapper re-validates the device and WebGPU capture
    state on every bind and re-wraps every output, which cost ~55 us a token on a 3-layer
    graph (0.28 ms vs 0.23 ms a decode step, measured) and grows with every layer's two KV
    tensors. Behaviour is the same; only that Python bookkeeping is skipped.
    """

    name = "ort"

    def __init__(self, bundle: Bundle, graph: GraphEntry, threads: int | None = None,
                 prefill_chunk: int | None = PREFILL_CHUNK, gqa_flash: bool | None = None):
        super().__init__(bundle, graph)
        self.threads = threads = threads or physical_cores()
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive number of positions or None, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk  # None: every prompt in one call
        path = bundle.file(graph.file)
        try:
            self._session = open_session(path, self._session_options(threads), gqa_flash,
                                         flash_default=tiled_attention(bundle.config, prefill_chunk))
        except ORT_ERRORS as exc:
            raise BundleError(f"onnxruntime cannot load graph {graph.file!r}: {_first_line(exc)}") from None
        sig = graph.signature
        _check_io(self._session, graph)
        self._past_names = sig.past_names()  # (K0, V0, K1, V1, ...), the order presents come out in
        self._present_names = sig.present_names()
        self._attention_names = sig.attention_names()
        self._n_kv = len(self._present_names)
        self._n_head = sig.n_head
        self._kv_dtype = np.dtype(sig.kv_dtype)
        self._kv_shape = (sig.kv_heads, sig.head_dim)
        self._cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self._binding = C.SessionIOBinding(self._session._sess)  # reused every step; only bindings change
        self._buffers = (KVBuffers(self._n_kv, sig.kv_heads, sig.head_dim, self._kv_dtype, bundle.config.block_size, self._cpu)
                         if graph.kv_shared_buffer else None)
        self._past: list = []  # copying mode: the KV cache as C-level OrtValues, never numpy
        self._keep: tuple = ()  # numpy buffers the binding points into, alive until the next step
        self._held: list[np.ndarray] = []  # put_cache's arrays, which the next step's pasts wrap
        self._logits: tuple | None = None  # shared-buffer mode: (array, OrtValue) for the logits
        self._logits_bound = None  # the OrtValue bound as the logits output now (None: unallocated)

    @property
    def shares_kv_buffer(self) -> bool:
        """Whether the graph writes the KV cache in place (the shared-buffer mode)."""
        return self._buffers is not None

    def _session_options(self, threads: int) -> ort.SessionOptions:
        """The session's options (samples/profile_step.py turns the profiler on here)."""
        return session_options(threads)

    def _prefill(self, input_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        B, T = input_ids.shape
        chunk = min(T, self.prefill_chunk or T)  # positions per call (PREFILL_CHUNK)
        keep: tuple = ()
        if self._buffers is not None:
            self._buffers.allocate(B, T)
            self._bind_buffers()
            past = None
        else:
            kvh, hs = self._kv_shape
            # One zero-length value serves every layer's empty past: (B, nkv, 0, hs).
            keep = (np.zeros((B, kvh, 0, hs), dtype=self._kv_dtype),)
            past = [C.OrtValue.ortvalue_from_numpy(keep[0], self._cpu)] * self._n_kv
        # Recording in chunks: per layer (B, nh, T, T) as one call returns it, each chunk's
        # (B, nh, c, a + c) rows written in, zero beyond them (the causal mask's zeros)
        full = ([np.zeros((B, self._n_head, T, T), np.float32) for _ in self._attention_names]
                if record_attention and chunk < T else None)
        for a in range(0, T, chunk):  # each chunk attends to the cache the ones before it wrote
            b = min(a + chunk, T)
            out = self._run(input_ids[:, a:b], attention_mask[:, :b], position_ids[:, a:b], past, record_attention, *keep)
            past = None if self._buffers is not None else self._past
            if full is not None:
                for layer, rows in zip(full, out.attentions):
                    layer[:, :, a:b, :b] = rows
        return out if full is None else StepOutput(out.logits, full)

    def _decode(self, next_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        if self._buffers is not None:
            if self._buffers.ensure(self.past_length):
                self._bind_buffers()
            return self._run(next_ids, attention_mask, position_ids, None, record_attention)
        out = self._run(next_ids, attention_mask, position_ids, self._past, record_attention)
        self._held = []  # the presents just made are onnxruntime's own: put_cache's arrays are free
        return out

    def _take_cache(self) -> list[np.ndarray]:
        if self._buffers is not None:
            return self._buffers.take(self.past_length)
        return [value.numpy() for value in self._past]  # host copies, (B, nkv, P, hs) each

    def _put_cache(self, arrays: list[np.ndarray]) -> None:
        if self._buffers is not None:
            self._buffers.put(arrays)  # copied into buffers with room to decode
            self._bind_buffers()
            return
        # ortvalue_from_numpy wraps the buffer without copying: keep the arrays alive until a step
        # has read them (the next decode's presents are new values).
        self._held = arrays
        self._past = [C.OrtValue.ortvalue_from_numpy(a, self._cpu) for a in arrays]

    def _bind_buffers(self) -> None:
        """Bind each buffer as its past input and its present output; the logits first, so that
        outputs come back in the copying mode's order (logits, presents, attentions)."""
        b = self._binding
        b.clear_binding_outputs()
        b.bind_output(io.LOGITS, self._cpu)
        self._logits_bound = None
        for past, present, value in zip(self._past_names, self._present_names, self._buffers.values):
            b.bind_ortvalue_input(past, value)
            b.bind_ortvalue_output(present, value)

    def _run(self, ids, mask, pos, past: list | None, record_attention: bool, *keep) -> StepOutput:
        """One step; `past` None: the shared buffers are bound already."""
        b = self._binding
        ids, mask, pos = _int64(ids), _int64(mask), _int64(pos)
        self._keep = (ids, mask, pos, *keep)  # the binding reads these buffers in place
        b.bind_input(io.INPUT_IDS, ids)
        b.bind_input(io.ATTENTION_MASK, mask)
        b.bind_input(io.POSITION_IDS, pos)
        cpu = self._cpu
        if past is None:  # replaces last step's binding, keeping its place
            logits_buffer = self._logits_buffer(ids.shape, record_attention)
            if logits_buffer is None:  # onnxruntime allocates them: bound afresh every step
                b.bind_output(io.LOGITS, cpu)
                self._logits_bound = None
            elif self._logits_bound is not logits_buffer[1]:  # the same buffer stays bound across steps
                b.bind_ortvalue_output(io.LOGITS, logits_buffer[1])
                self._logits_bound = logits_buffer[1]
        else:
            for name, value in zip(self._past_names, past):
                b.bind_ortvalue_input(name, value)
            # Outputs must be rebound unallocated each step: presents grow by one position, and
            # onnxruntime refuses to reuse last step's (shorter) buffers.
            b.clear_binding_outputs()
            b.bind_output(io.LOGITS, cpu)
            for name in self._present_names:
                b.bind_output(name, cpu)
        self._bind_attentions(ids, mask, record_attention)
        try:
            self._session._sess.run_with_iobinding(b, None)
        except (*ORT_ERRORS, RuntimeError) as exc:  # a failed run is a plain RuntimeError ("Error in execution")
            self.reset()
            raise RuntimeFailure(
                f"onnxruntime failed running {self.graph.file!r}: {_first_line(exc)}"
            ) from None
        if past is None and logits_buffer is not None:  # nothing else to fetch: no output wrappers
            return StepOutput(logits=logits_buffer[0][:, -1, :].copy())  # (B, V)
        outs = b.get_outputs()  # in binding order: logits, presents, attentions (or the scratch)
        n = self._n_kv
        if past is not None:
            self._past = [outs[i] for i in range(1, 1 + n)]
        attentions = (
            [outs[i].numpy() for i in range(1 + n, 1 + n + len(self._attention_names))]
            if record_attention
            else None
        )
        logits = outs[0].numpy()  # (B, T or 1, V), a host copy
        return StepOutput(logits=logits[:, -1, :], attentions=attentions)  # (B, V)

    def _logits_buffer(self, ids_shape, record_attention: bool):
        """(array, OrtValue) the shared-buffer mode writes last-position logits into, reused while
        the batch lasts; None where the outputs are fetched anyway (recording, all-logits graphs).
        Skipping `get_outputs` and the allocation: a tiny 12-layer graph's step 198 -> 176 us (best
        of 9 interleaved runs; the copying mode: 259 us), measured."""
        if record_attention or not self.graph.signature.last_logits_only:
            return None
        shape = (ids_shape[0], 1, self.graph.signature.vocab_size)
        if self._logits is None or self._logits[0].shape != shape:
            array = np.empty(shape, np.float32)
            self._logits = (array, C.OrtValue.ortvalue_from_numpy(array, self._cpu))
        return self._logits

    def _bind_attentions(self, ids, mask, record_attention: bool) -> None:
        b, cpu = self._binding, self._cpu
        if record_attention:
            for name in self._attention_names:
                b.bind_output(name, cpu)
        elif self._attention_names:
            # An audit graph computes every layer's attention probabilities whether or not they are
            # fetched, and onnxruntime keeps each graph output until the run ends: 12 x 12.6 MB at
            # prompt 512 on GPT-2-124M. Not recording, all of them are bound to one scratch buffer.
            # Layer i+1's softmax depends (through the residual stream) on layer i's probs @ V, so
            # each layer's probabilities are consumed before the next layer overwrites them; the
            # values are never read. Peak 770 -> 658 MiB at prompt 512, logits bit-identical (measured).
            scratch = np.empty((ids.shape[0], self._n_head, ids.shape[1], mask.shape[1]), np.float32)
            self._keep += (scratch,)
            value = C.OrtValue.ortvalue_from_numpy(scratch, cpu)
            for name in self._attention_names:
                b.bind_ortvalue_output(name, value)

    def _drop_cache(self) -> None:
        self._past = []
        self._keep = ()
        self._held = []
        if self._buffers is not None:
            self._buffers.clear()
        self._logits = None
        self._logits_bound = None
        if getattr(self, "_binding", None) is not None:
            self._binding.clear_binding_inputs()
            self._binding.clear_binding_outputs()

    def _release(self) -> None:
        self._binding = None
        self._session = None


def _int64(a: np.ndarray) -> np.ndarray:
    # bind_cpu_input wraps the numpy buffer as is, so it must be contiguous int64.
    return np.ascontiguousarray(a, dtype=np.int64)


def _check_io(session: ort.InferenceSession, graph: GraphEntry) -> None:
    sig = graph.signature
    problems = []
    for kind, have, want in (
        ("inputs", [i.name for i in session.get_inputs()], [s.name for s in sig.inputs()]),
        ("outputs", [o.name for o in session.get_outputs()], [s.name for s in sig.outputs()]),
    ):
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        if missing or extra:
            problems.append(f"{kind}: missing {missing[:3]}, unexpected {extra[:3]}")
    if problems:
        raise BundleError(
            f"graph {graph.file!r} does not match its manifest entry ({'; '.join(problems)}); "
            "re-export the bundle"
        )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_runtime(bundle: Bundle, graph: GraphEntry, threads: int | None) -> OrtRuntime:
    return OrtRuntime(bundle, graph, threads)
