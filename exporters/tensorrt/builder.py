"""The TensorRT calls of `build-engine`: strongly typed network, ONNX parser, profiles, timing cache.

Written against the TensorRT 10 Python API; the sequence follows NVIDIA's samples:
`samples/python/strongly_type_autocast/sample.py` (STRONGLY_TYPED network flag, parser errors),
Polygraphy `backend/trt/loader.py` (`parse_from_file` so external weights are found beside the
graph) and `backend/trt/config.py` (memory pool limit, timing cache, VERSION_COMPATIBLE,
`hardware_compatibility_level`).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from gptdeploy.errors import BackendUnavailable, ExportError
from gptdeploy.runtimes import cuda

log = logging.getLogger(__name__)

INSTALL = "pip install 'gptdeploy[tensorrt]'"


def import_tensorrt():
    """The `tensorrt` module, or BackendUnavailable naming what is missing and how to get it."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:  # also libnvinfer missing behind an installed wheel
        raise BackendUnavailable(
            f"TensorRT is not installed ({exc}); {INSTALL} on a machine with an NVIDIA GPU"
        ) from None
    version = str(getattr(trt, "__version__", "0"))
    if int(version.split(".")[0] or 0) < 10:
        raise BackendUnavailable(f"TensorRT {version} is too old (gptdeploy needs 10 or later); {INSTALL}")
    return trt


def require_tensorrt():
    """(tensorrt, cudart, DeviceInfo of GPU 0); BackendUnavailable names the first thing missing."""
    trt = import_tensorrt()
    cudart = cuda.load_cudart()
    device = cuda.require_gpu(cudart)
    return trt, cudart, device


def make_logger(trt):
    """A TensorRT logger that forwards to `logging` and keeps the errors, so a failed build can say
    why in one line (subclassing trt.ILogger as Polygraphy's `backend/trt/util.py` CustomTrtLogger does)."""

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

    return Collecting()


@dataclass
class BuildResult:
    plan: bytes
    timing_cache: bytes
    flags: list[str] = field(default_factory=list)


def build(
    trt,
    graph_path: Path,
    profiles: dict,
    *,
    workspace_bytes: int,
    hardware_compat: bool,
    version_compat: bool,
    timing_cache: Path,
) -> BuildResult:
    """Parse `graph_path` into a strongly typed network and build a serialized engine."""
    from gptdeploy.profiles import PHASES

    logger = make_logger(trt)
    builder = trt.Builder(logger)
    # Strongly typed: every tensor keeps the dtype the ONNX graph gives it, so an fp16 graph (fp16
    # weights and KV, fp32 LayerNorm / Softmax / logits) builds exactly that mix. TensorRT 10.12
    # deprecated the weak-typing BuilderFlag.FP16; precision lives in the graph.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(graph_path))  # a path, so model.onnx.data is found beside it
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]  # every error, not the first
    if not parsed or errors:
        raise ExportError(
            f"TensorRT's ONNX parser rejected {graph_path.name} ({len(errors)} error(s)): "
            + " | ".join(errors or ["no parser error recorded; see the TensorRT log"])
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    flags = ["STRONGLY_TYPED"]
    # TF32 is on by default (BuilderFlag.TF32 doc: inputs rounded to 10-bit mantissas); off, an fp32
    # graph computes in fp32 and gives the same greedy tokens as onnxruntime on the CPU.
    config.clear_flag(trt.BuilderFlag.TF32)
    flags.append("no TF32")
    if version_compat:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        flags.append("VERSION_COMPATIBLE")
    if hardware_compat:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        flags.append("AMPERE_PLUS")
    for index, phase in enumerate(PHASES):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles[phase].items():
            profile.set_shape(name, lo, opt, hi)
        added = config.add_optimization_profile(profile)
        if added != index:
            raise ExportError(f"TensorRT refused the {phase} optimization profile: {profiles[phase]}")
    cache = _timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(
            "TensorRT could not build the engine: "
            + (" | ".join(logger.errors[-3:]) or "see the TensorRT log")
            + ". A larger --workspace-gb or smaller limits may help"
        )
    return BuildResult(plan=bytes(plan), timing_cache=bytes(cache.serialize()), flags=flags)


def _timing_cache(config, path: Path):
    """Load the bundle's timing cache (or start an empty one) and attach it to the config."""
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this GPU / TensorRT; starting a new one", path.name)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config.get_timing_cache()
