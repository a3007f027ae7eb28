"""Bundle -> TensorRT engine under `engines/`, recorded in the manifest.

The pure parts (optimization profiles, engine names, manifest entries, the compatibility check)
import only the standard library and gptdeploy core, so the `tensorrt` runtime uses them on the
run path; `build_engine` imports TensorRT and cuda-python when called.

Two optimization profiles, one per phase, derived from the contract's axes:
::
    profile 0 "prefill": input_ids / position_ids (B, T), attention_mask (B, 0+T), past (B, kvh, 0, hs)
                         B 1..max_batch, T 1..max_context
    profile 1 "decode":  input_ids / position_ids (B, 1), attention_mask (B, P+1), past (B, kvh, P, hs)
                         B 1..max_batch, P 1..max_context-1
Every min / opt / max shape is built from one set of axis values, so the equal-dimension rules
(one batch everywhere, mask length = past + seq, position_ids shaped as input_ids) hold in each.
A 0-length past in a profile is legal: IOptimizationProfile::setDimensions requires
`0 <= minDims.d[i] <= optDims.d[i] <= maxDims.d[i]` (NvInferRuntime.h, TensorRT 8+; 7.x said 1 <=).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from gptdeploy import contract as io
from gptdeploy.bundle import MANIFEST, Bundle, GraphEntry, sha256_file
from gptdeploy.contract import GraphSignature
from gptdeploy.errors import BundleError, ExportError

log = logging.getLogger(__name__)

PHASES = ("prefill", "decode")  # profile index = position here
ENGINE_DIR = "engines"
AMPERE = (8, 0)  # HardwareCompatibilityLevel.AMPERE_PLUS: engines run on compute capability >= 8.0
Triple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


# ------------------------------------------------------------------------------------ profiles


def _shape(axes: tuple, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(a if isinstance(a, int) else dims[a] for a in axes)


def _dims(b: int, t: int, p: int) -> dict[str, int]:
    return {io.BATCH: b, io.SEQ: t, io.PAST: p, io.TOTAL: p + t}


def check_limits(max_batch: int, max_context: int, model_context: int | None = None) -> None:
    """Raise ExportError (one line) for limits no engine can have."""
    for name, value, least in (("max batch", max_batch, 1), ("max context", max_context, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ExportError(
                f"{name} must be an integer >= {least}, got {value!r}"
                + (" (decode needs at least one past position)" if least == 2 else "")
            )
    if model_context is not None and max_context > model_context:
        raise ExportError(
            f"max context {max_context} exceeds the model's {model_context} positions; "
            f"use --max-context {model_context} or less"
        )


def profile_shapes(
    sig: GraphSignature,
    max_batch: int,
    max_context: int,
    opt_batch: int | None = None,
    opt_context: int | None = None,
) -> dict[str, dict[str, Triple]]:
    """{"prefill": {input: (min, opt, max)}, "decode": {...}} for every graph input.

    opt defaults: batch 1 (the latency case), context max_context // 2 (prompt length for prefill,
    past length for decode, capped at max_context - 1)."""
    check_limits(max_batch, max_context)
    ob = 1 if opt_batch is None else opt_batch
    oc = max(1, max_context // 2) if opt_context is None else opt_context
    if not 1 <= ob <= max_batch or not 1 <= oc <= max_context:
        raise ExportError(f"opt batch {ob} / opt context {oc} must lie in 1..{max_batch} / 1..{max_context}")
    prefill = (_dims(1, 1, 0), _dims(ob, oc, 0), _dims(max_batch, max_context, 0))
    decode = (_dims(1, 1, 1), _dims(ob, 1, min(oc, max_context - 1)), _dims(max_batch, 1, max_context - 1))
    return {
        phase: {s.name: tuple(_shape(s.axes, d) for d in triple) for s in sig.inputs()}
        for phase, triple in zip(PHASES, (prefill, decode))
    }


def check_profiles(sig: GraphSignature, profiles: dict, max_context: int | None = None) -> list[str]:
    """Every way `profiles` breaks TensorRT's rules or the graph's equal-dimension constraints."""
    problems = []
    specs = {s.name: s for s in sig.inputs()}
    if sorted(profiles) != sorted(PHASES):
        return [f"profiles must be exactly {PHASES}, got {sorted(profiles)}"]
    for phase in PHASES:
        shapes = profiles[phase]
        if sorted(shapes) != sorted(specs):
            problems.append(f"{phase}: inputs {sorted(set(specs) ^ set(shapes))} missing or unexpected")
            continue
        for name, triple in shapes.items():
            if len(triple) != 3 or any(len(s) != len(specs[name].axes) for s in triple):
                problems.append(f"{phase}: {name} needs (min, opt, max) of rank {len(specs[name].axes)}")
                continue
            for i in range(len(specs[name].axes)):
                lo, mid, hi = (s[i] for s in triple)
                if not 0 <= lo <= mid <= hi:
                    problems.append(
                        f"{phase}: {name} axis {i} breaks 0 <= min <= opt <= max ({lo}, {mid}, {hi})"
                    )
        if any(p.startswith(f"{phase}: ") and "rank" in p for p in problems):
            continue
        for k, which in enumerate(("min", "opt", "max")):
            seen: dict[str, set] = {}
            for name, spec in specs.items():
                for axis, value in zip(spec.axes, shapes[name][k]):
                    if isinstance(axis, int):
                        if value != axis:
                            problems.append(
                                f"{phase} {which}: {name} has {value} where the graph fixes {axis}"
                            )
                    else:
                        seen.setdefault(axis, set()).add(value)
            for axis, values in seen.items():
                if len(values) > 1:
                    problems.append(f"{phase} {which}: axis {axis} differs between inputs {sorted(values)}")
            b, t, p, total = (min(seen.get(a, {0})) for a in (io.BATCH, io.SEQ, io.PAST, io.TOTAL))
            if total != p + t:
                problems.append(f"{phase} {which}: {io.ATTENTION_MASK} length {total} != past {p} + seq {t}")
            if b < 1 or t < 1:
                problems.append(f"{phase} {which}: batch and sequence must be >= 1 (got {b}, {t})")
            if phase == "prefill" and p != 0:
                problems.append(f"prefill {which}: past must be 0, got {p}")
            if phase == "decode" and (t != 1 or p < 1):
                problems.append(f"decode {which}: needs seq 1 and past >= 1, got seq {t}, past {p}")
            if max_context is not None and total > max_context:
                problems.append(f"{phase} {which}: {total} positions exceed max context {max_context}")
    return problems


def buffer_shapes(sig: GraphSignature, max_batch: int, max_context: int) -> dict[str, tuple[int, ...]]:
    """The largest shape of every graph input and output over both profiles; a past buffer is sized
    as a present so that the two can swap (present of step n is the past of step n+1)."""
    d = {io.BATCH: max_batch, io.SEQ: max_context, io.PAST: max_context, io.TOTAL: max_context}
    return {s.name: _shape(s.axes, d) for s in [*sig.inputs(), *sig.outputs()]}


# ---------------------------------------------------------------------- names, entries, compat


def trt_release(version: str) -> str:
    """ "10.13.0.35" -> "10.13.0": engines are tied to the release, not the build number."""
    parts = str(version).split(".")
    return ".".join((parts + ["0", "0"])[:3])


def _cc(compute_capability) -> tuple[int, int]:
    if isinstance(compute_capability, (tuple, list)):
        return int(compute_capability[0]), int(compute_capability[1])
    major, _, minor = str(compute_capability).partition(".")
    return int(major), int(minor or 0)


def engine_filename(
    compute_capability, trt_version: str, precision: str, hardware_compat: bool = False
) -> str:
    """`sm90-trt10.13.0-fp16.engine`; `sm80plus-...` for an Ampere-and-newer (hardware compatible) one."""
    major, minor = _cc(compute_capability)
    target = "sm80plus" if hardware_compat else f"sm{major}{minor}"
    return f"{target}-trt{trt_release(trt_version)}-{precision}.engine"


def timing_cache_filename(compute_capability, trt_version: str) -> str:
    """One timing cache per GPU and TensorRT release: a cache from another device is refused by
    IBuilderConfig::setTimingCache unless mismatches are ignored, which risks wrong tactics."""
    major, minor = _cc(compute_capability)
    return f"{ENGINE_DIR}/timing-sm{major}{minor}-trt{trt_release(trt_version)}.cache"


def engine_manifest_entry(
    *,
    file: str,
    sha256: str,
    graph: str,
    precision: str,
    compute_capability,
    trt_version: str,
    profiles: dict,
    max_batch: int,
    max_context: int,
    workspace_bytes: int,
    hardware_compat: bool,
    version_compat: bool,
    flags: list[str],
    timing_cache: str,
    device_name: str = "",
    build_seconds: float | None = None,
    precision_plan: dict | None = None,
) -> dict:
    major, minor = _cc(compute_capability)
    return {
        "file": file,
        "sha256": sha256,
        "graph": graph,
        "precision": precision,
        "compute_capability": f"{major}.{minor}",
        "device_name": device_name,
        "trt_version": trt_release(trt_version),
        "trt_build": str(trt_version),
        "hardware_compat": "ampere_plus" if hardware_compat else "none",
        "version_compatible": bool(version_compat),
        "limits": {"max_batch": max_batch, "max_context": max_context},
        "profiles": {ph: {n: [list(s) for s in t] for n, t in profiles[ph].items()} for ph in PHASES},
        "workspace_bytes": int(workspace_bytes),
        "flags": list(flags),
        "timing_cache": timing_cache,
        "build_seconds": build_seconds,
        "precision_plan": precision_plan or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def rebuild_command(entry: dict, bundle: str | os.PathLike = "BUNDLE") -> str:
    limits = entry.get("limits", {}) if isinstance(entry, dict) else {}
    cmd = f"gptdeploy build-engine {bundle}"
    if isinstance(entry, dict) and entry.get("graph"):
        cmd += f" --graph {entry['graph']}"
    for key, option in (("max_batch", "--max-batch"), ("max_context", "--max-context")):
        if isinstance(limits, dict) and limits.get(key):
            cmd += f" {option} {limits[key]}"
    if isinstance(entry, dict) and entry.get("hardware_compat") == "ampere_plus":
        cmd += " --hardware-compat"
    if isinstance(entry, dict) and entry.get("version_compatible"):
        cmd += " --version-compat"
    return cmd


ENTRY_FIELDS = ("file", "sha256", "graph", "compute_capability", "trt_version", "profiles", "limits")


def compat_check(
    entry: dict, device_cc, trt_version: str, bundle: str | os.PathLike = "BUNDLE"
) -> str | None:
    """Why `entry` cannot run on a GPU of compute capability `device_cc` with TensorRT `trt_version`
    (a message ending in the rebuild command), or None when it can."""
    fix = f"rebuild it here: {rebuild_command(entry, bundle)}"
    missing = [f for f in ENTRY_FIELDS if not isinstance(entry, dict) or f not in entry]
    if missing:
        return (
            f"engine entry {entry.get('file', '?') if isinstance(entry, dict) else entry!r} is malformed "
            f"(missing {', '.join(missing)}); {fix}"
        )
    name = entry["file"]
    try:
        built = tuple(map(int, trt_release(entry["trt_version"]).split(".")))
        want = _cc(entry["compute_capability"])
    except (TypeError, ValueError):
        return f"engine entry {name} is malformed (trt_version / compute_capability unreadable); {fix}"
    here, have = tuple(map(int, trt_release(trt_version).split("."))), _cc(device_cc)
    if entry.get("version_compatible"):
        if here < built:  # version-compatible plans run on the same or a later TensorRT only
            return (
                f"engine {name} needs TensorRT {entry['trt_version']} or later; this machine has "
                f"{trt_release(trt_version)}; {fix}"
            )
    elif here != built:
        return (
            f"engine {name} was built with TensorRT {entry['trt_version']}; this machine has "
            f"{trt_release(trt_version)}; {fix}"
        )
    if entry.get("hardware_compat") == "ampere_plus":
        if have < AMPERE:
            return (
                f"engine {name} runs on Ampere or newer (compute capability >= 8.0); this GPU is "
                f"{have[0]}.{have[1]}; {fix}"
            )
    elif have != want:
        return (
            f"engine {name} was built for compute capability {want[0]}.{want[1]}; this GPU is "
            f"{have[0]}.{have[1]}; {fix}"
        )
    return None


def select_engine(engines: list, graph: str, device_cc, trt_version: str, bundle="BUNDLE") -> dict:
    """The first engine of `graph` that runs here; BundleError with every reason and the rebuild
    command otherwise."""
    mine = [e for e in engines if isinstance(e, dict) and e.get("graph") == graph]
    if not mine:
        raise BundleError(
            f"bundle has no TensorRT engine for graph {graph!r}; build one: "
            f"gptdeploy build-engine {bundle} --graph {graph}"
        )
    reasons = []
    for entry in mine:
        problem = compat_check(entry, device_cc, trt_version, bundle)
        if problem is None:
            return entry
        reasons.append(problem)
    raise BundleError("no engine in the bundle runs here: " + " | ".join(reasons))


# -------------------------------------------------------------------------- static graph checks


def precision_plan(onnx_path):
    """See graph_checks.precision_plan (needs the `onnx` package)."""
    from gptdeploy.exporters.graph_checks import precision_plan as plan

    return plan(onnx_path)


def check_trt_operators(onnx_path) -> list[str]:
    """See graph_checks.check_trt_operators (needs the `onnx` package)."""
    from gptdeploy.exporters.graph_checks import check_trt_operators as check

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
    from gptdeploy.exporters import tensorrt_build  # TensorRT only from here on

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
