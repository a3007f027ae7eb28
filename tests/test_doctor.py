"""`gptdeploy doctor` on fake machines: a GPU box with nvidia-smi, one seen only through cuda-python,
and a bare CPU box; the text and JSON renderings; backend verdicts with their fixes."""

from __future__ import annotations

import json
import types

from click.testing import CliRunner

from gptdeploy import doctor
from gptdeploy.doctor import Gpu, Probes, backend_status, diagnose, render
from tests.fake_tensorrt import FakeCudart

SMI_QUERY = "NVIDIA H100 80GB HBM3, 9.0, 81559 MiB, 550.54.15\nNVIDIA A10, 8.6, 23028 MiB, 550.54.15\n"
SMI_HEADER = "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4     |\n"


def _modules(**present):
    """An import_module probe that knows only `present` (module name -> module)."""

    def import_module(name):
        if name in present:
            return present[name]
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    return import_module


def _ort(*providers):
    return types.SimpleNamespace(__version__="1.20.1", get_available_providers=lambda: list(providers))


def _torch(cuda: bool):
    return types.SimpleNamespace(__version__="2.5.1", cuda=types.SimpleNamespace(is_available=lambda: cuda))


def _probes(modules, smi=True, **kw):
    def run(cmd):
        if not smi:
            return None
        return SMI_QUERY if any(a.startswith("--query-gpu=") for a in cmd) else SMI_HEADER

    return Probes(
        run=run,
        which=lambda name: "/usr/bin/nvidia-smi" if smi else None,
        import_module=_modules(**modules),
        version=lambda module_name, dists, module: getattr(module, "__version__", "?"),
        cpu_model=lambda: "Fake CPU 9000",
        physical_cores=lambda: 8,
        logical_cores=lambda: 16,
        **kw,
    )


def test_gpu_machine_with_everything():
    trt = types.SimpleNamespace(__version__="10.13.0.35")
    cudart = FakeCudart()
    cudart.__version__ = "12.6.0"
    report = diagnose(
        _probes(
            {
                "torch": _torch(True),
                "onnx": types.SimpleNamespace(__version__="1.17.0"),
                "onnxruntime": _ort(
                    "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
                ),
                "tensorrt": trt,
                "cuda.bindings.runtime": cudart,
            }
        )
    )
    assert report.gpu_source == "nvidia-smi"
    assert report.gpus == [
        Gpu("NVIDIA H100 80GB HBM3", "9.0", "81559 MiB"),
        Gpu("NVIDIA A10", "8.6", "23028 MiB"),
    ]
    assert report.driver == "550.54.15" and report.cuda == "12.4"
    assert report.packages == {
        "torch": "2.5.1",
        "onnx": "1.17.0",
        "onnxruntime": "1.20.1",
        "tensorrt": "10.13.0.35",
        "cuda-python": "12.6.0",
    }
    assert report.torch_cuda == "yes" and "CUDAExecutionProvider" in report.ort_providers
    assert report.cpu == "Fake CPU 9000" and report.cpu_cores == "8 physical / 16 logical"
    assert all(s.available for s in report.backends.values()), report.backends
    text = render(report)
    assert "GPU 0         NVIDIA H100 80GB HBM3, compute capability 9.0, 81559 MiB" in text
    assert "tensorrt      available" in text and "CUDA          12.4" in text


def test_gpu_seen_only_through_cuda_python():
    cudart = FakeCudart(cc=(8, 9), name=b"NVIDIA L4")
    report = diagnose(
        _probes({"onnxruntime": _ort("CPUExecutionProvider"), "cuda.bindings.runtime": cudart}, smi=False)
    )
    assert report.gpu_source == "cuda-python"
    assert report.gpus == [Gpu("NVIDIA L4", "8.9", "81920 MiB")] and report.cuda == "12.4"
    t = report.backends["tensorrt"]
    assert (
        not t.available
        and t.missing == "tensorrt is not installed"
        and t.fix == "pip install 'gptdeploy[tensorrt]'"
    )
    oc = report.backends["ort-cuda"]
    assert (
        oc.missing == "onnxruntime has no CUDAExecutionProvider"
        and "onnxruntime-gpu replaces onnxruntime" in oc.fix
    )


def test_bare_cpu_machine_says_what_each_backend_needs():
    report = diagnose(_probes({"onnxruntime": _ort("CPUExecutionProvider")}, smi=False))
    assert (
        report.gpus == []
        and report.gpu_source == "none"
        and report.driver == "none"
        and report.cuda == "none"
    )
    assert report.packages["tensorrt"] == "not installed" and report.torch_cuda == "torch not installed"
    b = report.backends
    assert b["ort"].available
    assert b["tensorrt"].missing == (
        "tensorrt is not installed; cuda-python is not installed; "
        "no NVIDIA GPU found (nvidia-smi / CUDA see none)"
    )
    assert b["torch"].missing == "torch is not installed; onnx is not installed"
    assert b["torch"].fix == "pip install 'gptdeploy[export]'"
    assert b["torch-cuda"].missing == (
        "torch is not installed; onnx is not installed; no NVIDIA GPU found (nvidia-smi / CUDA see none)"
    )
    text = render(report)
    assert "GPU           none" in text
    assert (
        "tensorrt      missing: tensorrt is not installed; cuda-python is not installed; no NVIDIA GPU"
        in text
    )
    assert "fix: pip install 'gptdeploy[tensorrt]'" in text


def test_a_broken_wheel_is_reported_not_raised():
    def import_module(name):
        if name == "tensorrt":
            raise OSError("libnvinfer.so.10: cannot open shared object file")
        raise ModuleNotFoundError(name)

    report = diagnose(
        Probes(
            run=lambda cmd: None,
            which=lambda n: None,
            import_module=import_module,
            cpu_model=lambda: "x",
            physical_cores=lambda: 1,
            logical_cores=lambda: 1,
        )
    )
    assert report.packages["tensorrt"].startswith("broken (libnvinfer.so.10")
    assert "tensorrt is not installed" in report.backends["tensorrt"].missing


def test_backend_status_is_pure():
    versions = {
        "torch": "2.5.1",
        "onnx": "1.17",
        "onnxruntime": "1.20",
        "tensorrt": "10.13",
        "cuda-python": "12.6",
    }
    gpus = [Gpu("g", "9.0", "1 MiB")]
    s = backend_status(versions, ["CUDAExecutionProvider"], gpus, torch_cuda="yes")
    assert all(v.available for v in s.values())
    s = backend_status(versions, ["CUDAExecutionProvider"], [])
    assert not s["tensorrt"].available and not s["ort-cuda"].available and s["torch"].available
    assert not s["torch-cuda"].available
    s = backend_status(versions, [], gpus, torch_cuda="no")  # a CPU build of torch on a GPU machine
    assert s["torch"].available and s["torch-cuda"].missing == "torch sees no CUDA device (a CPU build, or no GPU)"
    assert "download.pytorch.org/whl/cu128" in s["torch-cuda"].fix


def test_doctor_command_text_and_json(monkeypatch):
    from gptdeploy.cli.engine import doctor as doctor_cmd

    fake = _probes({"onnxruntime": _ort("CPUExecutionProvider")}, smi=False)
    monkeypatch.setattr(doctor, "diagnose", lambda probes=fake: diagnose(fake))
    result = CliRunner().invoke(doctor_cmd, ["--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["backends"]["ort"] == {"available": True, "missing": "", "fix": ""}
    assert data["packages"]["tensorrt"] == "not installed" and data["gpus"] == []
    result = CliRunner().invoke(doctor_cmd, [])
    assert result.exit_code == 0 and result.output.startswith("gptdeploy doctor\n")
    assert "Fake CPU 9000" in result.output


def test_doctor_on_this_machine_runs():
    report = diagnose()
    assert report.python and report.backends["ort"].available
    json.dumps(report.to_dict())


def test_a_cuda_error_is_reported_by_name_not_as_no_gpu():
    cudart = FakeCudart(device_error=35)  # cuda-python 13 on a CUDA 12 driver
    report = diagnose(_probes({"onnxruntime": _ort("CPUExecutionProvider"), "cuda.bindings.runtime": cudart}, smi=False))
    assert report.gpus == [] and report.cuda.startswith("unusable: cudaErrorInsufficientDriver")
    assert "upgrade the driver" in render(report)
