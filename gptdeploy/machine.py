"""Facts about this machine that decide speed and what can run: CPU, cores, kernel-deciding CPU
flags, installed packages, NVIDIA GPUs. Read by doctor, bench, export (tool versions), the audit
(versions in each record) and the `ort` runtime (its default thread count)."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

# Report name -> (modules to try importing, distributions that provide it).
PACKAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "torch": (("torch",), ("torch",)),
    "onnx": (("onnx",), ("onnx",)),
    "onnxruntime": (("onnxruntime",), ("onnxruntime-gpu", "onnxruntime")),
    "tensorrt": (("tensorrt",), ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")),
    "cuda-python": (("cuda.bindings.runtime", "cuda.cudart"), ("cuda-python", "cuda-bindings")),
}
# The flags (as /proc/cpuinfo spells them) that decide which matmul kernels onnxruntime's MLAS
# and llama.cpp's ggml pick: AVX2/FMA, AVX-512, VNNI (int8 dot products), BF16, AMX.
KERNEL_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve",
)


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """The kernel-deciding flags this CPU has, of KERNEL_FLAGS (empty where /proc/cpuinfo is absent)."""
    for line in _cpuinfo():
        key = line.partition(":")[0].strip()
        if key in ("flags", "Features"):  # x86, arm64
            have = set(line.partition(":")[2].split())
            return [f for f in KERNEL_FLAGS if f in have]
    return []


def physical_cores() -> int:
    """Physical cores this process may run on: hyperthreads share one core's FMA units, so
    matmul-bound decoding gains nothing from them. Falls back to the CPUs allowed."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    cores, phys, core = set(), None, None
    for line in [*_cpuinfo(), ""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not key and core is not None:
            cores.add((phys, core))
            phys = core = None
    return max(1, min(len(cores) or allowed, allowed))


def distribution_version(dists: Iterable[str]) -> str | None:
    """The version of the first of `dists` that is installed, or None."""
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions(dists: Iterable[str]) -> dict[str, str]:
    """Python and each installed one of `dists`, by distribution name; absent ones are left out."""
    out = {"python": platform.python_version()}
    for dist in dists:
        if (v := distribution_version([dist])) is not None:
            out[dist] = v
    return out


def nvidia_smi(fields: str, timeout: float = 10) -> list[list[str]] | None:
    """Rows of `nvidia-smi --query-gpu=FIELDS --format=csv,noheader`; None without nvidia-smi."""
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [[p.strip() for p in line.split(",")] for line in done.stdout.strip().splitlines() if line.strip()]


# Environment variables that change which kernels or how many threads the measured libraries use
# (onnxruntime's attention kernel switch, OpenMP / MKL / OpenBLAS threads, ggml's settings).
KERNEL_ENV_PREFIXES = ("ORT_", "OMP_", "MKL_", "OPENBLAS_", "GGML_", "LLAMA_")


def kernel_env() -> dict[str, str]:
    """The set KERNEL_ENV_PREFIXES variables, as the process runs with them."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(KERNEL_ENV_PREFIXES)}


def facts(threads: int, dists: Iterable[str]) -> dict:
    """What a benchmark figure depends on, for its JSON."""
    gpus = nvidia_smi("name,memory.total,driver_version")
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "threads": threads,
        "versions": versions(dists),
        "gpu": "; ".join(", ".join(row) for row in gpus) if gpus else None,
        "env": kernel_env(),
    }
