"""The TensorRT calls of `build-engine`: strongly typed network, ONNX parser, profiles, timing cache.

Written against the TensorRT 10 Python API; the sequence follows NVIDIA's samples:
`samples/python/strongly_type_autocast/sample.py` (STRONGLY_TYPED network flag, parser errors),
Polygraphy `backend/trt/loader.py` (`parse_from_file` so external weights are found beside the
graph) and `backend/trt/config.py` (memory pool limit, timing cache, VERSION_COMPATIBLE,
`hardware_compatibility_level`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from gptdeploy.errors import ExportError
from gptdeploy.profiles import PHASES
from gptdeploy.runtimes import cuda
from gptdeploy.runtimes.trt import import_tensorrt, make_logger

log = logging.getLogger(__name__)


def require_tensorrt():
    """(tensorrt, cudart, DeviceInfo of GPU 0); BackendUnavailable names the first thing missing."""
    trt = import_tensorrt()
    cudart = cuda.load_cudart()
    device = cuda.require_gpu(cudart)
    return trt, cudart, device


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
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = _parse(trt, builder, logger, graph_path)
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
    _add_profiles(builder, config, profiles)
    cache = _timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(
            f"TensorRT could not build the engine: {logger.last()}. "
            "A larger --workspace-gb or smaller limits may help"
        )
    return BuildResult(plan=bytes(plan), timing_cache=bytes(cache.serialize()), flags=flags)


def _parse(trt, builder, logger, graph_path: Path):
    """The graph as a strongly typed network; ExportError with every parser error."""
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
    return network


def _add_profiles(builder, config, profiles: dict) -> None:
    """One optimization profile per phase, profile i = PHASES[i]; ExportError naming the tensor whose
    shapes TensorRT refuses (pyCore.cpp's set_shape raises RuntimeError when setDimensions fails)."""
    for index, phase in enumerate(PHASES):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles[phase].items():
            try:
                profile.set_shape(name, lo, opt, hi)
            except RuntimeError as exc:
                raise ExportError(
                    f"TensorRT refused the {phase} profile shapes of {name} "
                    f"(min {tuple(lo)}, opt {tuple(opt)}, max {tuple(hi)}): {exc}"
                ) from None
        added = config.add_optimization_profile(profile)
        if added != index:
            raise ExportError(f"TensorRT refused the {phase} optimization profile: {profiles[phase]}")


def _timing_cache(config, path: Path):
    """Load the bundle's timing cache (or start an empty one) and attach it to the config."""
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this GPU / TensorRT; starting a new one", path.name)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config.get_timing_cache()
