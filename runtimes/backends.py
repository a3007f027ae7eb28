"""The registry of runtime backends, chosen by name, and the one definition of what each needs.

Each backend declares the packages it imports, the onnxruntime execution provider it needs and
whether it needs an NVIDIA GPU, with the command that installs what it lacks. `missing` checks
those needs on this machine (then the backend module's own device check); `doctor` judges the
same declarations over the facts it probed (`missing_from`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Collection
from dataclasses import dataclass

from gptdeploy.bundle import Bundle
from gptdeploy.errors import BackendUnavailable, BundleError, GenerationError
from gptdeploy.machine import PACKAGES
from gptdeploy.runtimes.base import RuntimeBase

log = logging.getLogger(__name__)

NO_GPU = "no NVIDIA GPU found (nvidia-smi / CUDA see none)"
NO_TORCH_CUDA = "torch sees no CUDA device (a CPU build, or no GPU)"


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # holds open_runtime(bundle, graph, threads), and missing() where a device must be checked
    description: str
    packages: tuple[str, ...]  # gptdeploy.machine.PACKAGES names it imports
    install: str  # the command that provides what it needs
    provider: str | None = None  # the onnxruntime execution provider it needs
    gpu: bool = False
    torch_cuda: bool = False  # needs a CUDA build of torch


_EXPORT = "pip install 'gptdeploy[export]'"
BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("ort", "gptdeploy.runtimes.ort", "onnxruntime on the CPU", ("onnxruntime",),
            "pip install onnxruntime"),
    Backend("ort-cuda", "gptdeploy.runtimes.ort_cuda", "onnxruntime with CUDA, KV cache on the GPU",
            ("onnxruntime",), "pip install 'gptdeploy[gpu]' (onnxruntime-gpu replaces onnxruntime: "
            "pip uninstall onnxruntime first)", provider="CUDAExecutionProvider", gpu=True),
    Backend("tensorrt", "gptdeploy.runtimes.tensorrt", "TensorRT engines built for this GPU",
            ("tensorrt", "cuda-python"), "pip install 'gptdeploy[tensorrt]'", gpu=True),
    Backend("torch", "gptdeploy.runtimes.torch", "the canonical PyTorch module (reference)",
            ("torch", "onnx"), _EXPORT),
    Backend("torch-cuda", "gptdeploy.runtimes.torch_cuda",
            "the canonical PyTorch module on the GPU, in the graph's precision (eager baseline)",
            ("torch", "onnx"), "a CUDA build of torch on an NVIDIA GPU machine: pip install torch "
            "--index-url https://download.pytorch.org/whl/cu128, and 'gptdeploy[export]'",
            gpu=True, torch_cuda=True),
)}
AUTO_ORDER = ("tensorrt", "ort-cuda", "ort")  # best first; torch is a reference, never chosen by auto


def missing_from(backend: Backend, installed: Collection[str], providers: Collection[str],
                 gpu: bool, torch_cuda: bool) -> list[str]:
    """What `backend` lacks on a machine described by these facts (pure: doctor's verdict)."""
    out = [f"{p} is not installed" for p in backend.packages if p not in installed]
    if backend.provider and "onnxruntime" in installed and backend.provider not in providers:
        out.append(f"onnxruntime has no {backend.provider}")
    if backend.torch_cuda and "torch" in installed and not torch_cuda:
        out.append(NO_TORCH_CUDA)
    if backend.gpu and not gpu:
        out.append(NO_GPU)
    return out


def _import_problem(package: str) -> str | None:
    modules = PACKAGES[package][0]
    for module in modules:
        try:
            importlib.import_module(module)
            return None
        except ImportError as exc:  # also an installed wheel whose shared libraries are missing
            problem = f"{package} is not installed ({exc})"
        except OSError as exc:
            problem = f"{package} is installed but broken ({exc})"
    return problem


def missing(name: str) -> str | None:
    """What this machine lacks for backend `name`, with the command that fixes it; None when usable."""
    backend = BACKENDS[name]
    problems = [p for p in map(_import_problem, backend.packages) if p]
    if problems:
        return "; ".join(problems) + f"; {backend.install}"
    if backend.provider:
        import onnxruntime

        have = onnxruntime.get_available_providers()
        if backend.provider not in have:
            return (f"onnxruntime has no {backend.provider} (available: {', '.join(have)}); "
                    f"{backend.install} on a machine with an NVIDIA GPU")
    check = getattr(importlib.import_module(backend.module), "missing", None)
    return check() if check else None


def available_backends() -> list[str]:
    return [name for name in BACKENDS if missing(name) is None]


def resolve_backend(name: str) -> str:
    """The registry name `name` stands for: "auto" becomes the best backend usable on this machine."""
    if name == "auto":
        usable = _auto_candidates()
        if not usable:
            raise BackendUnavailable("no runtime backend is usable: " + (missing("ort") or ""))
        return usable[0]
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if problem := missing(name):
        raise BackendUnavailable(f"backend {name!r} is unavailable: {problem}")
    return name


def _auto_candidates() -> list[str]:
    return [n for n in AUTO_ORDER if missing(n) is None]


def check_threads(threads: int | None) -> int | None:
    """None stays None: each backend picks its own default (the `ort` one: physical cores)."""
    if threads is None:
        return None
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise GenerationError(f"threads must be a positive integer, got {threads!r}")
    return threads


def _open(name: str, bundle: Bundle, graph, threads: int | None) -> RuntimeBase:
    return importlib.import_module(BACKENDS[name].module).open_runtime(bundle, graph, threads)


def open_runtime(
    bundle: Bundle, backend: str = "auto", graph: str | None = None, threads: int | None = None
) -> RuntimeBase:
    """Build the runtime `backend` for one graph of `bundle`. "auto" takes the best backend that
    can run this bundle here: a GPU backend whose bundle lacks an engine for this GPU falls back."""
    threads = check_threads(threads)
    entry = bundle.graph(graph)
    if backend != "auto":
        return _open(resolve_backend(backend), bundle, entry, threads)
    candidates = _auto_candidates()
    if not candidates:
        resolve_backend("auto")  # raises, naming what is missing
    for name in candidates[:-1]:
        try:
            return _open(name, bundle, entry, threads)
        except (BackendUnavailable, BundleError) as exc:
            log.info("auto backend: %s cannot run %s (%s); trying the next", name, bundle.path, exc)
    return _open(candidates[-1], bundle, entry, threads)
