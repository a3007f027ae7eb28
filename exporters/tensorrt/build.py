"""Bundle -> TensorRT engine under `engines/`, recorded in the manifest.

The pure parts live in `trt_profiles` (optimization profiles from the contract) and
`trt_engines` (engine names, manifest entries, the compatibility check): they import only the
standard library and gptdeploy core, so the `tensorrt` runtime uses them on the run path, and
they are re-exported here. `build_engine` imports TensorRT and cuda-python when called.
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

from gptdeploy.bundle import MANIFEST, Bundle, GraphEntry, sha256_file
from gptdeploy.engines import (  # noqa: F401 - re-exported
    AMPERE,
    ENGINE_DIR,
    ENTRY_FIELDS,
    compat_check,
    engine_filename,
    engine_manifest_entry,
    rebuild_command,
    select_engine,
    timing_cache_filename,
    trt_release,
)
from gptdeploy.errors import ExportError
from gptdeploy.profiles import (
    PHASES,
    buffer_shapes,
    check_limits,
    check_profiles,
    profile_shapes,
)

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------- static graph checks


def precision_plan(onnx_path):
    """See graph_checks.precision_plan (needs the `onnx` package)."""
    from gptdeploy.exporters.tensorrt.checks import precision_plan as plan

    return plan(onnx_path)


def check_trt_operators(onnx_path) -> list[str]:
    """See graph_checks.check_trt_operators (needs the `onnx` package)."""
    from gptdeploy.exporters.tensorrt.checks import check_trt_operators as check

    return check(onnx_path)


# --------------------------------------------------------------------------------- the build


def choose_graph(bundle: Bundle, name: str | None) -> GraphEntry:
    """`name`, or by default the fp16 graph when the bundle has one (TensorRT's case), else fp32."""
    if name is None:
        name = "fp16" if "fp16" in bundle.manifest.graphs else None
    return bundle.graph(name)


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
    max_context = bundle.manifest.max_context if max_context is None else max_context
    check_limits(max_batch, max_context, bundle.manifest.max_context)
    if not workspace_gb > 0:
        raise ExportError(f"workspace must be a positive number of GiB, got {workspace_gb!r}")
    profiles = profile_shapes(entry_graph.signature, max_batch, max_context, opt_batch, opt_context)
    problems = check_profiles(entry_graph.signature, profiles, max_context)
    if problems:  # profile_shapes builds them right; this guards the contract against drift
        raise ExportError("optimization profiles are inconsistent: " + "; ".join(problems))
    graph_path = bundle.file(entry_graph.file)
    plan = _static_checks(graph_path, entry_graph)

    trt, cudart, device = tensorrt_build.require_tensorrt()
    started = time.perf_counter()
    name = engine_filename(device.compute_capability, trt.__version__, entry_graph.precision, hardware_compat)
    engine_rel, cache_rel = (
        f"{ENGINE_DIR}/{name}",
        timing_cache_filename(device.compute_capability, trt.__version__),
    )
    workspace = int(workspace_gb * (1 << 30))
    result = tensorrt_build.build(
        trt,
        graph_path,
        profiles,
        workspace_bytes=workspace,
        hardware_compat=hardware_compat,
        version_compat=version_compat,
        timing_cache=bundle.path / cache_rel,
    )
    engine_path = bundle.path / engine_rel
    try:
        _write_atomic(engine_path, result.plan)
        _write_atomic(bundle.path / cache_rel, result.timing_cache)
    except OSError as exc:
        raise ExportError(f"cannot write {engine_rel} into {bundle.path}: {exc.strerror or exc}") from None
    entry = engine_manifest_entry(
        file=engine_rel,
        sha256=sha256_file(engine_path),
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


def _static_checks(graph_path: Path, entry_graph: GraphEntry) -> dict:
    """Operator table and fp16 rules, before a long build; skipped (with a warning) without `onnx`,
    in which case TensorRT's parser still reports every error itself."""
    try:
        import onnx  # noqa: F401 - the `tensorrt` extra does not require it
    except ImportError:
        log.warning("onnx is not installed: skipping the static operator and precision checks")
        return {}
    problems = check_trt_operators(graph_path)
    if problems:
        raise ExportError(
            f"graph {entry_graph.file!r} uses what TensorRT cannot parse: " + "; ".join(problems)
        )
    plan = precision_plan(graph_path)
    if plan.problems:
        raise ExportError(f"graph {entry_graph.file!r} breaks the fp16 rules: " + "; ".join(plan.problems))
    return {"precision": plan.precision, "kept_fp32": plan.kept_fp32, "weights": plan.weights}


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


__all__ = [
    "PHASES",
    "buffer_shapes",
    "build_engine",
    "check_limits",
    "check_profiles",
    "check_trt_operators",
    "choose_graph",
    "compat_check",
    "engine_filename",
    "engine_manifest_entry",
    "precision_plan",
    "profile_shapes",
    "rebuild_command",
    "record_engine",
    "select_engine",
    "timing_cache_filename",
    "trt_release",
]
