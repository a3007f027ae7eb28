"""TensorRT on the run path: the import and version check, a logger that keeps the errors, and one
execution context per optimization profile. `build-engine` imports these from here; runtimes never
import exporters.

Contexts: creating one per profile once and never switching replaces a setOptimizationProfileAsync
per generation, which "will trigger layer resource updates on the next call of enqueueV3()"
(NvInferRuntime.h, IExecutionContext::setOptimizationProfileAsync). They share one activation
buffer: prefill and decode run one after the other on one stream, and NvInferRuntime.h
(IExecutionContext::setDeviceMemoryV2) forbids only use "in another execution context running in
parallel". So two contexts take the device memory of one.
"""

from __future__ import annotations

import importlib
import logging

from gptdeploy.errors import BackendUnavailable, GenerationError
from gptdeploy.profiles import PHASES
from gptdeploy.runtimes import cuda

log = logging.getLogger(__name__)

INSTALL = "pip install 'gptdeploy[tensorrt]'"
# 10.1 added IExecutionContext::setDeviceMemoryV2 and ICudaEngine::getDeviceMemorySizeV2
# (NVIDIA/TensorRT include/NvInferRuntime.h, "TensorRT OSS 10.1 GA Release"), which the shared
# activation buffer below uses.
MIN_VERSION = (10, 1)


def import_tensorrt():
    """The `tensorrt` module, or BackendUnavailable naming what is missing and how to get it."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:  # also libnvinfer missing behind an installed wheel
        raise BackendUnavailable(
            f"TensorRT is not installed ({exc}); {INSTALL} on a machine with an NVIDIA GPU"
        ) from None
    version = str(getattr(trt, "__version__", "0"))
    parts = [int(p) if p.isdigit() else 0 for p in (version.split(".") + ["0"])[:2]]
    if tuple(parts) < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        raise BackendUnavailable(f"TensorRT {version} is too old (gptdeploy needs {need}+); {INSTALL}")
    return trt


def make_logger(trt):
    """A TensorRT logger that forwards to `logging` and keeps the errors, so a failure can say why in
    one line (subclassing trt.ILogger as Polygraphy's `backend/trt/util.py` CustomTrtLogger does)."""

    class Collecting(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif severity == trt.Logger.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

        def last(self, n: int = 3) -> str:
            return " | ".join(self.errors[-n:]) or "see the TensorRT log"

    return Collecting()


def profile_contexts(trt, engine, cudart, stream, logger, fix: str):
    """(contexts, activations): one execution context per phase, context i on profile i, sharing one
    device buffer for their activations. BackendUnavailable, with `fix`, when TensorRT cannot make one
    (createExecutionContext returns null, e.g. without the device memory it needs)."""
    size = int(engine.device_memory_size_v2)  # the largest over all profiles
    try:
        activations = cuda.DeviceBuffer(cudart, size, "TensorRT activations")
    except GenerationError as exc:  # out of memory here is this machine's limit, as for a context
        raise BackendUnavailable(f"{exc}; {fix}") from None
    contexts = []
    try:
        for index, phase in enumerate(PHASES):
            ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise BackendUnavailable(
                    f"TensorRT could not create the {phase} execution context ({logger.last()}); "
                    f"free GPU memory (nvidia-smi shows who holds it) or {fix}"
                )
            contexts.append(ctx)
            ctx.set_device_memory(activations.ptr, size)
            if index:  # a new context starts on profile 0 (ICudaEngine::createExecutionContext)
                try:  # pyCore.cpp: raises RuntimeError when setOptimizationProfileAsync returns false
                    ctx.set_optimization_profile_async(index, stream.handle)
                except RuntimeError as exc:
                    raise BackendUnavailable(f"TensorRT refused the {phase} profile ({exc}); {fix}") from None
    except BaseException:
        contexts.clear()  # contexts go before the memory they use
        activations.free()
        raise
    return contexts, activations
