"""The Runtime protocol and the registry of backends, chosen by name.

A runtime runs one graph of a loaded bundle and owns its KV cache wherever that lives best
(OrtValues, device buffers, torch tensors). The Generator above it sees only host logits of
the last position, [B, V] float32, and, when asked, the attention rows of the step.
Shapes: B batch, T new positions, P past positions, nh heads, V model vocab (graph rows).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from gptdeploy.bundle import Bundle, GraphEntry
from gptdeploy.errors import BackendUnavailable, BundleError, GenerationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutput:
    """What one prefill or decode step hands back to the host."""

    logits: np.ndarray  # (B, V) float32, last position only
    attentions: list[np.ndarray] | None = None  # per layer (B, nh, T, P+T) float32, when recorded


@runtime_checkable
class Runtime(Protocol):
    """One graph, one KV cache. The batch is fixed from `prefill` until the next `prefill` or `reset`."""

    name: str  # registry name: "ort", "torch", ...
    graph: GraphEntry
    past_length: int  # positions held in the KV cache (P)

    def prefill(
        self,
        input_ids: np.ndarray,  # (B, T) int64
        attention_mask: np.ndarray,  # (B, T) int64, 1 = real token, 0 = left padding
        position_ids: np.ndarray,  # (B, T) int64
        record_attention: bool = False,
    ) -> StepOutput:
        """Drop any cache, run the prompt, keep its keys and values."""
        ...

    def decode(
        self,
        next_ids: np.ndarray,  # (B, 1) int64
        attention_mask: np.ndarray,  # (B, P+1) int64
        position_ids: np.ndarray,  # (B, 1) int64
        record_attention: bool = False,
    ) -> StepOutput:
        """Run one new position per row on top of the cache and extend it."""
        ...

    def reset(self) -> None:
        """Drop the KV cache (the next call must be `prefill`)."""
        ...

    def close(self) -> None:
        """Release the session / model; the runtime cannot be used afterwards."""
        ...


class RuntimeBase:
    """Shared bookkeeping: cache length, shape checks that turn engine errors into clear ones,
    context management. Subclasses implement `_prefill`, `_decode`, `_drop_cache`, `_release`."""

    name = "base"

    def __init__(self, bundle: Bundle, graph: GraphEntry):
        self.bundle = bundle
        self.graph = graph
        self.past_length = 0
        self._batch = 0
        self._closed = False

    # -- the protocol ---------------------------------------------------------------------

    def prefill(self, input_ids, attention_mask, position_ids, record_attention=False) -> StepOutput:
        self._check_open(record_attention)
        B, T = input_ids.shape
        if T < 1 or attention_mask.shape != (B, T) or position_ids.shape != (B, T):
            raise GenerationError(
                f"prefill needs input_ids, attention_mask and position_ids of one shape (B, T>=1); got "
                f"{input_ids.shape}, {attention_mask.shape}, {position_ids.shape}"
            )
        self.reset()
        out = self._prefill(input_ids, attention_mask, position_ids, record_attention)
        self._batch, self.past_length = B, T
        return out

    def decode(self, next_ids, attention_mask, position_ids, record_attention=False) -> StepOutput:
        self._check_open(record_attention)
        if self.past_length == 0:
            raise GenerationError("decode called before prefill (or after reset); run prefill first")
        B, P = self._batch, self.past_length
        if next_ids.shape != (B, 1) or position_ids.shape != (B, 1) or attention_mask.shape != (B, P + 1):
            raise GenerationError(
                f"decode expects next_ids and position_ids ({B}, 1) and attention_mask ({B}, {P + 1}); got "
                f"{next_ids.shape}, {position_ids.shape}, {attention_mask.shape}"
            )
        out = self._decode(next_ids, attention_mask, position_ids, record_attention)
        self.past_length = P + 1
        return out

    def reset(self) -> None:
        self._drop_cache()
        self.past_length = 0
        self._batch = 0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop_cache()
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- for subclasses -------------------------------------------------------------------

    def _check_open(self, record_attention: bool) -> None:
        if self._closed:
            raise GenerationError(f"the {self.name} runtime is closed; load a new one")
        if record_attention and not self.graph.signature.attentions:
            raise GenerationError(
                f"graph {self.graph.name!r} has no attention outputs; export with attentions to record them"
            )

    def _prefill(self, input_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        raise NotImplementedError

    def _decode(self, next_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        raise NotImplementedError

    def _drop_cache(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------- thread settings


def physical_cores() -> int:
    """Physical cores this process may run on: hyperthreads share one core's FMA units, so
    matmul-bound decoding gains nothing from them. Falls back to os.cpu_count()."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    cores = set()
    try:
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = value.strip()
            elif key == "core id":
                core = value.strip()
            elif not key and core is not None:
                cores.add((phys, core))
                phys = core = None
        if core is not None:
            cores.add((phys, core))
    except OSError:
        pass
    return max(1, min(len(cores) or allowed, allowed))


def check_threads(threads: int | None) -> int | None:
    """None stays None: each backend picks its own default (the `ort` one: physical cores)."""
    if threads is None:
        return None
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise GenerationError(f"threads must be a positive integer, got {threads!r}")
    return threads


# ---------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Backend:
    name: str
    missing: Callable[[], str | None]  # what is missing on this machine, or None when usable
    module: str | None  # module holding `open_runtime(bundle, graph, threads)`; None: not built yet
    description: str


def _module_missing(module: str) -> str | None:
    """The backend module's own `missing()` check (GPU present, libraries loadable, ...)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return f"{module} cannot be imported ({exc})"
    check = getattr(mod, "missing", None)
    return check() if check else None


def _missing_ort() -> str | None:
    try:
        importlib.import_module("onnxruntime")
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc}); pip install onnxruntime"
    return None


def _missing_ort_cuda() -> str | None:
    if problem := _missing_ort():
        return problem
    import onnxruntime as ort

    have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:  # checked here first: cheap, and the usual answer
        return (
            "onnxruntime has no CUDAExecutionProvider (available: " + ", ".join(have) + "); "
            "install onnxruntime-gpu (pip install 'gptdeploy[gpu]') on a machine with an NVIDIA GPU"
        )
    return _module_missing("gptdeploy.runtimes.ort_cuda")


def _missing_tensorrt() -> str | None:
    try:
        importlib.import_module("tensorrt")
    except ImportError as exc:
        return (
            f"TensorRT is not installed ({exc}); pip install 'gptdeploy[tensorrt]' on an NVIDIA GPU machine"
        )
    return _module_missing("gptdeploy.runtimes.tensorrt")


def _missing_torch() -> str | None:
    for module, why in (
        ("torch", "torch"),
        ("onnx", "onnx (the torch runtime reads weights from the graph)"),
    ):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return (
                f"the torch runtime needs {why}, which is not installed ({exc}); "
                "pip install 'gptdeploy[export]'"
            )
    return None


def _missing_torch_cuda() -> str | None:
    return _missing_torch() or _module_missing("gptdeploy.runtimes.torch_cuda")


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("ort", _missing_ort, "gptdeploy.runtimes.ort", "onnxruntime on the CPU"),
        Backend(
            "ort-cuda",
            _missing_ort_cuda,
            "gptdeploy.runtimes.ort_cuda",
            "onnxruntime with CUDA, KV cache on the GPU",
        ),
        Backend(
            "tensorrt",
            _missing_tensorrt,
            "gptdeploy.runtimes.tensorrt",
            "TensorRT engines built for this GPU",
        ),
        Backend(
            "torch", _missing_torch, "gptdeploy.runtimes.torch", "the canonical PyTorch module (reference)"
        ),
        Backend(
            "torch-cuda",
            _missing_torch_cuda,
            "gptdeploy.runtimes.torch_cuda",
            "the canonical PyTorch module on the GPU, in the graph's precision (eager baseline)",
        ),
    )
}
AUTO_ORDER = ("tensorrt", "ort-cuda", "ort")  # best first; torch is a reference, never chosen by auto


def available_backends() -> list[str]:
    return [name for name, b in BACKENDS.items() if b.module and b.missing() is None]


def resolve_backend(name: str) -> str:
    """The registry name `name` stands for: "auto" becomes the best backend usable on this machine."""
    if name == "auto":
        usable = _auto_candidates()
        if not usable:
            raise BackendUnavailable("no runtime backend is usable: " + (BACKENDS["ort"].missing() or ""))
        return usable[0]
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    backend = BACKENDS[name]
    if problem := backend.missing():
        raise BackendUnavailable(f"backend {name!r} is unavailable: {problem}")
    if backend.module is None:
        raise BackendUnavailable(f"backend {name!r} is not part of this gptdeploy version; use ort")
    return name


def _auto_candidates() -> list[str]:
    return [n for n in AUTO_ORDER if BACKENDS[n].module and BACKENDS[n].missing() is None]


def open_runtime(
    bundle: Bundle, backend: str = "auto", graph: str | None = None, threads: int | None = None
) -> RuntimeBase:
    """Build the runtime `backend` for one graph of `bundle`. "auto" takes the best backend that
    can run this bundle here: a GPU backend whose bundle lacks an engine for this GPU falls back."""
    threads = check_threads(threads)
    entry = bundle.graph(graph)
    if backend != "auto":
        name = resolve_backend(backend)
        return importlib.import_module(BACKENDS[name].module).open_runtime(bundle, entry, threads)
    candidates = _auto_candidates()
    if not candidates:
        resolve_backend("auto")  # raises, naming what is missing
    for name in candidates[:-1]:
        try:
            return importlib.import_module(BACKENDS[name].module).open_runtime(bundle, entry, threads)
        except (BackendUnavailable, BundleError) as exc:
            log.info("auto backend: %s cannot run %s (%s); trying the next", name, bundle.path, exc)
    return importlib.import_module(BACKENDS[candidates[-1]].module).open_runtime(bundle, entry, threads)
