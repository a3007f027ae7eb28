"""Bundle -> TensorRT engine under `engines/`, recorded in the manifest.

The pure parts of the engine contract live in gptdeploy/profiles.py (optimization profiles) and
gptdeploy/engines.py (names, manifest entries, the compatibility check), which the `tensorrt`
runtime reads too; the static graph checks in checks.py. `build_engine` imports TensorRT and
cuda-python only when called.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from gptdeploy.bundle import Bundle
from gptdeploy.engines import (
    AMPERE,
    ENGINE_DIR,
    engine_filename,
    engine_manifest_entry,
    timing_cache_filename,
)
from gptdeploy.errors import ExportError
from gptdeploy.hashing import sha256_file
from gptdeploy.manifest import MANIFEST, GraphEntry
from gptdeploy.profiles import check_limits, check_profiles, default_max_context, profile_shapes

log = logging.getLogger(__name__)


def choose_graph(bundle: Bundle, name: str | None) -> GraphEntry:
    """`name`, or by default the fp16 graph when the bundle has one (TensorRT's case), else fp32;
    refused when it is a graph for onnxruntime's CPU provider (quantized, or fused with contrib ops)."""
    if name is None:
        name = "fp16" if "fp16" in bundle.manifest.graphs else None
    entry = bundle.graph(name)
    if kind := bundle.manifest.cpu_graph(entry):
        raise ExportError(
            f"graph {entry.name!r} is {kind} for onnxruntime on CPUs (com.microsoft ops), which TensorRT cannot "
            "parse; export the model with --fp16, or --portable for an fp32 engine"
        )
    return entry


def build_engine(
    bundle_path: str | os.PathLike,
    *,
    max_batch: int = 4,
    max_context: int | None = None,
    workspace_gb: float = 4.0,
    graph: str | None = None,
    hardware_compat: bool = False,
    version_compat: bool = False,
    opt_batch: int | None = None,
    opt_context: int | None = None,
) -> dict:
    """Build a TensorRT engine for this GPU from one graph of the bundle; returns its manifest entry.

    Limits and the graph are checked before TensorRT is touched, so a wrong option fails fast and the
    same way on machines without a GPU. BackendUnavailable without TensorRT, cuda-python or a GPU."""
    from gptdeploy.exporters.tensorrt import builder as tensorrt_build  # TensorRT only from here on

    bundle = Bundle.load(bundle_path)
    entry_graph = choose_graph(bundle, graph)
    max_context = _checked_limits(bundle, entry_graph, max_batch, max_context, workspace_gb)
    profiles = _checked_profiles(entry_graph, max_batch, max_context, opt_batch, opt_context)
    graph_path = bundle.file(entry_graph.file)
    plan = _static_checks(graph_path, entry_graph)

    trt, _, device = tensorrt_build.require_tensorrt()
    _check_hardware_compat(device, hardware_compat)
    started = time.perf_counter()
    name = engine_filename(device.compute_capability, trt.__version__, entry_graph.precision, hardware_compat)
    engine_rel = f"{ENGINE_DIR}/{name}"
    cache_rel = timing_cache_filename(device.compute_capability, trt.__version__)
    workspace = int(workspace_gb * (1 << 30))
    result = tensorrt_build.build(
        trt, graph_path, profiles, workspace_bytes=workspace, hardware_compat=hardware_compat,
        version_compat=version_compat, timing_cache=bundle.path / cache_rel,
    )
    _write_files(bundle, {engine_rel: result.plan, cache_rel: result.timing_cache})
    entry = engine_manifest_entry(
        file=engine_rel,
        sha256=sha256_file(bundle.path / engine_rel),
        graph=entry_graph.name,
        precision=entry_graph.precision,
        compute_capability=device.compute_capability,
        trt_version=trt.__version__,
        profiles=profiles,
        max_batch=max_batch,
        max_context=max_context,
        workspace_bytes=workspace,
        hardware_compat=hardware_compat,
        version_compat=version_compat,
        flags=result.flags,
        timing_cache=cache_rel,
        device_name=device.name,
        build_seconds=round(time.perf_counter() - started, 2),
        precision_plan=plan,
    )
    try:
        record_engine(bundle, entry)
    except OSError as exc:
        raise ExportError(f"cannot update {bundle.path / MANIFEST}: {exc.strerror or exc}") from None
    log.info("built %s in %.1f s", engine_rel, entry["build_seconds"])
    return entry


def _checked_limits(bundle: Bundle, entry_graph: GraphEntry, max_batch, max_context, workspace_gb) -> int:
    """The context to build for (the model's, capped, when not given), every limit checked."""
    if max_context is None:  # the model's, capped: a RoPE model's context can be 131072 (profiles.py)
        check_limits(max_batch, 2)  # the batch first: the default context is sized with it
        max_context = default_max_context(entry_graph.signature, bundle.manifest.max_context, max_batch)
    check_limits(max_batch, max_context, bundle.manifest.max_context)
    if not workspace_gb > 0:
        raise ExportError(f"workspace must be a positive number of GiB, got {workspace_gb!r}")
    return max_context


def _checked_profiles(entry_graph: GraphEntry, max_batch, max_context, opt_batch, opt_context) -> dict:
    """The prefill and decode profiles for these limits, checked against the graph's contract."""
    profiles = profile_shapes(entry_graph.signature, max_batch, max_context, opt_batch, opt_context)
    problems = check_profiles(entry_graph.signature, profiles, max_context)
    if problems:  # profile_shapes builds them right; this guards the contract against drift
        raise ExportError("optimization profiles are inconsistent: " + "; ".join(problems))
    return profiles


def _check_hardware_compat(device, hardware_compat: bool) -> None:
    """Before the build: AMPERE_PLUS "is only supported for engines built on NVIDIA Ampere and later
    GPUs" (NvInfer.h, HardwareCompatibilityLevel::kAMPERE_PLUS), which TensorRT says only mid-build."""
    major, _, minor = device.compute_capability.partition(".")
    if hardware_compat and (int(major), int(minor or 0)) < AMPERE:
        raise ExportError(
            f"--hardware-compat builds an Ampere-and-newer engine, which TensorRT builds only on an "
            f"Ampere or newer GPU (compute capability >= 8.0); this GPU ({device.name}) is "
            f"{device.compute_capability}. Build without --hardware-compat, or on an Ampere+ GPU"
        )


def _static_checks(graph_path: Path, entry_graph: GraphEntry) -> dict:
    """Operator table and the precision rules of the graph's precision, before a long build; skipped
    (with a warning) without `onnx`, in which case TensorRT's parser still reports every error itself."""
    try:
        import onnx  # noqa: F401 - the `tensorrt` extra does not require it
    except ImportError:
        log.warning("onnx is not installed: skipping the static operator and precision checks")
        return {}
    from gptdeploy.exporters.tensorrt.checks import check_trt_operators, precision_plan

    problems = check_trt_operators(graph_path)
    if problems:
        raise ExportError(
            f"graph {entry_graph.file!r} uses what TensorRT cannot parse: " + "; ".join(problems)
        )
    plan = precision_plan(graph_path, entry_graph.precision)
    if plan.problems:
        raise ExportError(f"graph {entry_graph.file!r} breaks the fp16 rules: " + "; ".join(plan.problems))
    return {"precision": plan.precision, "kept_fp32": plan.kept_fp32, "weights": plan.weights}


def _write_files(bundle: Bundle, files: dict[str, bytes]) -> None:
    """Each file atomically under the bundle; ExportError naming the one that could not be written."""
    for rel, data in files.items():
        try:
            _write_atomic(bundle.path / rel, data)
        except OSError as exc:
            raise ExportError(f"cannot write {rel} into {bundle.path}: {exc.strerror or exc}") from None


def _write_atomic(path: Path, data) -> None:
    """Write to a temporary file beside `path`, then os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_engine(bundle: Bundle, entry: dict) -> None:
    """Add `entry` to the manifest (replacing one for the same file) and list the engine's SHA-256
    with the bundle's files; the new manifest replaces the old one atomically."""
    m = bundle.manifest
    engines = [e for e in m.engines if not (isinstance(e, dict) and e.get("file") == entry["file"])] + [entry]
    updated = replace(m, engines=engines, files={**m.files, entry["file"]: entry["sha256"]})
    text = json.dumps(updated.to_dict(), indent=2, ensure_ascii=False) + "\n"
    _write_atomic(bundle.path / MANIFEST, text.encode("utf-8"))
    bundle.manifest, bundle.manifest_sha256 = updated, hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = ["build_engine", "choose_graph", "record_engine"]
