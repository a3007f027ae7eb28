"""`gptdeploy doctor`: what this machine has for gptdeploy, as a report a user can paste into a bug.

`diagnose(probes)` is pure over its probes (subprocess runner, module importer, ...), so tests
feed it a fake machine; `render(report)` turns the result into text, `report.to_dict()` into JSON.
GPU facts come from `nvidia-smi --query-gpu=... --format=csv,noheader` when it is on PATH, else
from cuda-python (cudaGetDeviceProperties, cudaDriverGetVersion), else they are "none".
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from gptdeploy import machine
from gptdeploy.runtimes.backends import BACKENDS, missing_from

SMI_FIELDS = "name,compute_cap,memory.total,driver_version"


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str
    memory: str  # as the probe reports it, e.g. "81559 MiB"


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    missing: str = ""  # what is missing, when not available
    fix: str = ""  # the command that fixes it


@dataclass
class Report:
    os: str
    python: str
    cpu: str
    cpu_cores: str  # "8 physical / 16 logical"
    gpus: list[Gpu]
    driver: str
    cuda: str
    gpu_source: str  # "nvidia-smi", "cuda-python" or "none"
    packages: dict[str, str]  # name -> version or "not installed"
    torch_cuda: str  # "yes", "no", or "torch not installed"
    ort_providers: list[str]
    backends: dict[str, BackendStatus] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _version(module_name: str, dists: tuple[str, ...], module) -> str:
    return machine.distribution_version(dists) or str(getattr(module, "__version__", "installed"))


@dataclass(frozen=True)
class Probes:
    """Everything `diagnose` asks the machine; replace any of them to test."""

    run: Callable[[list[str]], str | None] = _run  # stdout of a command, None when it fails
    which: Callable[[str], str | None] = shutil.which
    import_module: Callable[[str], object] = importlib.import_module
    version: Callable[[str, tuple, object], str] = _version
    cpu_model: Callable[[], str] = machine.cpu_model
    physical_cores: Callable[[], int] = machine.physical_cores
    logical_cores: Callable[[], int | None] = os.cpu_count


def _imported(probes: Probes) -> tuple[dict[str, object], dict[str, str]]:
    modules, versions = {}, {}
    for name, (module_names, dists) in machine.PACKAGES.items():
        versions[name] = "not installed"
        for module_name in module_names:
            try:
                modules[name] = probes.import_module(module_name)
            except ImportError:
                continue
            except OSError as exc:  # a wheel whose CUDA libraries are missing
                versions[name] = f"broken ({exc})"
                break
            versions[name] = probes.version(module_name, dists, modules[name])
            break
    return modules, versions


def _gpus_from_smi(probes: Probes) -> tuple[list[Gpu], str, str] | None:
    if not probes.which("nvidia-smi"):
        return None
    out = probes.run(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"])
    if out is None:
        return None
    gpus, driver = [], ""
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            gpus.append(Gpu(parts[0], parts[1], parts[2]))
            driver = parts[3]
    header = probes.run(["nvidia-smi"]) or ""
    cuda = header.split("CUDA Version:")[1].split()[0] if "CUDA Version:" in header else "unknown"
    return gpus, driver, cuda


def _gpus_from_cudart(cudart) -> tuple[list[Gpu], str, str] | None:
    from gptdeploy.runtimes import cuda

    ok = cudart.cudaError_t.cudaSuccess
    err, count = cudart.cudaGetDeviceCount()
    if err != ok:
        if cuda.error_name(cudart, err) == "cudaErrorNoDevice":
            return None
        # Not "no GPU": CUDA itself failed (cuda-python 13 on a CUDA 12 driver gives error 35).
        return [], "unknown (no nvidia-smi)", f"unusable: {cuda.describe(cudart, err)}"
    gpus = []
    for i in range(count):
        err, prop = cudart.cudaGetDeviceProperties(i)
        if err == ok:
            name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
            gpus.append(
                Gpu(name.rstrip("\x00"), f"{prop.major}.{prop.minor}", f"{prop.totalGlobalMem >> 20} MiB")
            )
    err, version = cudart.cudaDriverGetVersion()  # 12040 -> "12.4": the CUDA the driver supports
    cuda = f"{version // 1000}.{version % 1000 // 10}" if err == ok and version else "unknown"
    return gpus, "unknown (no nvidia-smi)", cuda


def backend_status(
    versions: dict[str, str], providers: list[str], gpus: list[Gpu], torch_cuda: str = "no"
) -> dict[str, BackendStatus]:
    """Per backend: usable, or what is missing and the fix, judged by the registry's own
    declarations (gptdeploy.runtimes.backends) over these facts. Pure."""
    installed = {name for name, v in versions.items() if not v.startswith(("not installed", "broken"))}
    out = {}
    for name, backend in BACKENDS.items():
        missing = missing_from(backend, installed, providers, bool(gpus), torch_cuda == "yes")
        out[name] = BackendStatus(not missing, "; ".join(missing), backend.install if missing else "")
    return out


def diagnose(probes: Probes = Probes()) -> Report:
    modules, versions = _imported(probes)
    found = _gpus_from_smi(probes)
    source = "nvidia-smi" if found else "none"
    if found is None and "cuda-python" in modules:
        try:
            found = _gpus_from_cudart(modules["cuda-python"])
            source = "cuda-python" if found else "none"
        except Exception:  # noqa: BLE001 - a driver-less machine can fail inside the binding
            found = None
    gpus, driver, cuda = found or ([], "none", "none")
    torch_cuda = "torch not installed"
    if "torch" in modules:
        torch_cuda = "yes" if modules["torch"].cuda.is_available() else "no"
    providers = list(modules["onnxruntime"].get_available_providers()) if "onnxruntime" in modules else []
    logical = probes.logical_cores()
    return Report(
        os=f"{platform.system()} {platform.release()} ({platform.machine()})",
        python=f"{platform.python_version()} ({platform.python_implementation()})",
        cpu=probes.cpu_model(),
        cpu_cores=f"{probes.physical_cores()} physical / {logical or '?'} logical",
        gpus=gpus,
        driver=driver,
        cuda=cuda,
        gpu_source=source,
        packages=versions,
        torch_cuda=torch_cuda,
        ort_providers=providers,
        backends=backend_status(versions, providers, gpus, torch_cuda),
    )


def render(report: Report) -> str:
    lines = [
        "gptdeploy doctor",
        f"  OS            {report.os}",
        f"  Python        {report.python}",
        f"  CPU           {report.cpu} ({report.cpu_cores})",
    ]
    if report.gpus:
        for i, g in enumerate(report.gpus):
            lines.append(f"  GPU {i}         {g.name}, compute capability {g.compute_capability}, {g.memory}")
    else:
        lines.append("  GPU           none")
    lines += [
        f"  driver        {report.driver}",
        f"  CUDA          {report.cuda}   (GPU facts from {report.gpu_source})",
        "packages",
        *(f"  {name:<13} {version}" for name, version in report.packages.items()),
        f"  torch CUDA    {report.torch_cuda}",
        f"  ORT providers {', '.join(report.ort_providers) or 'none'}",
        "backends",
    ]
    for name, s in report.backends.items():
        lines.append(
            f"  {name:<13} available" if s.available else f"  {name:<13} missing: {s.missing}; fix: {s.fix}"
        )
    return "\n".join(lines)


__all__ = ["BackendStatus", "Gpu", "Probes", "Report", "backend_status", "diagnose", "render"]
