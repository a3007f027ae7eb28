"""`build-engine` through the CLI on machines without TensorRT, cuda-python or a GPU, and with
limits no engine can have: one line, exit code 2, and the install command where one helps."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tests.fake_tensorrt import FakeCudart, install_cudart, make_tensorrt
from tests.runtime_bundles import copy_bundle, made


@pytest.fixture
def cli_group():
    """The lead's group when it registers the commands; otherwise the same error mapping around them."""
    from gptdeploy import cli as cli_mod
    from gptdeploy.cli.engine import build_engine, doctor

    if "build-engine" in cli_mod.cli.commands:
        return cli_mod.cli
    return cli_mod._Group(commands={"build-engine": build_engine, "doctor": doctor})


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    return copy_bundle(made("small").bundle, tmp_path / "b")


def _one_line_error(result, pattern):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]


def test_build_engine_without_tensorrt_names_it_and_the_install_command(cli_group, bundle_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    result = CliRunner().invoke(cli_group, ["build-engine", str(bundle_copy)])
    _one_line_error(result, r"TensorRT is not installed .*pip install 'gptdeploy\[tensorrt\]'")
    assert not (bundle_copy / "engines").exists()


def test_build_engine_without_cuda_python_or_without_a_gpu(cli_group, bundle_copy, monkeypatch):
    cudart = FakeCudart(devices=0)
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(cudart))
    for name in ("cuda", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    result = CliRunner().invoke(cli_group, ["build-engine", str(bundle_copy)])
    _one_line_error(result, r"cuda-python is not installed .*pip install 'gptdeploy\[tensorrt\]'")
    install_cudart(monkeypatch, cudart)
    result = CliRunner().invoke(cli_group, ["build-engine", str(bundle_copy)])
    _one_line_error(result, r"no NVIDIA GPU is visible to CUDA")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--max-context", "1"], r"Invalid value for '?--max-context'?: 1 is below 2"),
        (["--max-context", "129"], r"max context 129 exceeds the model's 128 positions"),
        (["--max-batch", "0"], r"Invalid value for '?--max-batch'?"),
        (["--workspace-gb", "0"], r"Invalid value for '?--workspace-gb'?"),
        (["--graph", "fp16"], r"bundle has no graph 'fp16'; it has fp32"),
    ],
)
def test_build_engine_rejects_bad_limits_before_looking_for_tensorrt(
    cli_group, bundle_copy, monkeypatch, args, pattern
):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = CliRunner().invoke(cli_group, ["build-engine", str(bundle_copy), *args])
    assert result.exit_code == 2, result.output
    assert re.search(pattern, result.output), result.output
    assert "TensorRT is not installed" not in result.output


def test_build_engine_on_a_missing_bundle_is_one_line(cli_group, tmp_path):
    result = CliRunner().invoke(cli_group, ["build-engine", str(tmp_path / "nope")])
    _one_line_error(result, r"bundle .*nope does not exist")


def test_commands_are_click_commands_with_their_names():
    from gptdeploy.cli.engine import build_engine, doctor

    assert isinstance(build_engine, click.Command) and build_engine.name == "build-engine"
    assert isinstance(doctor, click.Command) and doctor.name == "doctor"
