"""`gptdeploy build-engine` and `gptdeploy doctor`. Registered on the group in gptdeploy/cli/main.py.

Library errors (GptDeployError, BackendUnavailable among them) propagate to the group, which
prints one line and exits 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from gptdeploy.profiles import DEFAULT_BUFFER_BUDGET, DEFAULT_MAX_CONTEXT  # the default limits, in the help


@click.command("build-engine")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Largest batch the engine accepts.",
)
@click.option(
    "--max-context",
    type=int,
    help="Positions (prompt + generated) the engine accepts [default: the model's context, at most "
    f"{DEFAULT_MAX_CONTEXT} and what keeps the runtime's buffers within {DEFAULT_BUFFER_BUDGET >> 30} GiB].",
)
@click.option(
    "--workspace-gb",
    type=click.FloatRange(min=0, min_open=True),
    default=4.0,
    show_default=True,
    help="TensorRT builder workspace limit, GiB.",
)
@click.option(
    "--graph",
    type=click.Choice(["fp16", "fp32"]),
    help="Graph to build from [default: fp16 when the bundle has one]. Precision comes from the graph.",
)
@click.option("--hardware-compat", is_flag=True, help="Build for every Ampere-or-newer GPU (slower engine).")
@click.option("--version-compat", is_flag=True, help="Let later TensorRT releases load the engine.")
def build_engine(
    bundle: Path,
    max_batch: int,
    max_context: int | None,
    workspace_gb: float,
    graph: str | None,
    hardware_compat: bool,
    version_compat: bool,
) -> None:
    """Build a TensorRT engine for this GPU from BUNDLE's graph and record it in the manifest."""
    from gptdeploy.exporters.tensorrt import build_engine as build  # TensorRT only when building
    from gptdeploy.manifest import MANIFEST, Manifest

    if max_context is not None and max_context < 2:
        raise click.BadParameter(
            f"{max_context} is below 2 (decode needs at least one past position)", param_hint="--max-context"
        )
    entry = build(
        bundle,
        max_batch=max_batch,
        max_context=max_context,
        workspace_gb=workspace_gb,
        graph=graph,
        hardware_compat=hardware_compat,
        version_compat=version_compat,
    )
    limits = entry["limits"]
    click.echo(
        f"wrote {bundle / entry['file']} ({entry['device_name']}, compute capability "
        f"{entry['compute_capability']}, TensorRT {entry['trt_version']}, batch <= {limits['max_batch']}, "
        f"{limits['max_context']} positions, built in {entry['build_seconds']} s)"
    )
    # build() checked the bundle; its manifest (now with the engine) says the model's context
    model_context = Manifest.from_dict(json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))).max_context
    if max_context is None and limits["max_context"] < model_context:
        click.echo(
            f"note: {limits['max_context']} of the model's {model_context} positions by default "
            f"(at most {DEFAULT_MAX_CONTEXT}, buffers within {DEFAULT_BUFFER_BUDGET >> 30} GiB); "
            f"--max-context N raises it"
        )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json: bool) -> None:
    """Report this machine's OS, CPU, GPU, CUDA and packages, and what each backend needs."""
    from gptdeploy.doctor import diagnose, render

    report = diagnose()
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else render(report))
