"""TensorRT engine files: names that say GPU, TensorRT release and precision; manifest entries;
the compatibility check on load and the rebuild command. Pure functions, no TensorRT.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from gptdeploy.errors import BundleError
from gptdeploy.profiles import PHASES

ENGINE_DIR = "engines"
AMPERE = (8, 0)  # HardwareCompatibilityLevel.AMPERE_PLUS: engines run on compute capability >= 8.0
# Version-compatible engines (BuilderFlag.VERSION_COMPATIBLE, TensorRT 8.6 on) run on the release that
# built them and later releases of its major ("built ... using TensorRT 11.0 will be compatible with
# TensorRT 11.1 and later 11.x versions", TensorRT 11.1 guide, Engine Compatibility). Across majors
# exactly two pairs: "TensorRT 10 version-compatible engines can run with a TensorRT 11 runtime, and
# TensorRT 8 version-compatible engines can run with a TensorRT 10 runtime. No other combination across
# major versions is supported" (TensorRT 11.4.1 Support Matrix, Engine Portability).
VERSION_COMPAT_SINCE = (8, 6)
CROSS_MAJOR = {8: 10, 10: 11}  # engine's major -> the one later major whose runtime runs it


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
        if problem := _version_compat_problem(built, here):
            return f"engine {name} {problem}; this machine has {trt_release(trt_version)}; {fix}"
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


def _version_compat_problem(built: tuple[int, ...], here: tuple[int, ...]) -> str | None:
    """Why a version-compatible engine built with TensorRT `built` cannot run on `here`, or None."""
    release = ".".join(map(str, built))
    if built[:2] < VERSION_COMPAT_SINCE:
        return f"claims version compatibility, which TensorRT has since 8.6 only, but is from {release}"
    if here < built:
        return f"needs TensorRT {release} or later"
    if here[0] != built[0] and CROSS_MAJOR.get(built[0]) != here[0]:
        later = f" and on TensorRT {CROSS_MAJOR[built[0]]}.x" if built[0] in CROSS_MAJOR else ""
        return f"(TensorRT {release}, version-compatible) runs on later {built[0]}.x releases{later} only"
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
