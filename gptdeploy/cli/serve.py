"""`gptdeploy serve`: an OpenAI-compatible HTTP server over a bundle, requests batched as they
arrive. Registered on the group in gptdeploy/cli/main.py; errors become one line and exit 2 there."""

from __future__ import annotations

from pathlib import Path

import click

from gptdeploy.cli.generate import runtime_options
from gptdeploy.errors import BackendUnavailable


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface)."
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="TCP port (0: any free one).",
)
@click.option(
    "--model-name", "model", help="The model name clients send (default: the bundle directory's name)."
)
@click.option(
    "--max-batch", type=click.IntRange(1), default=8, show_default=True, help="Requests decoded together."
)
@click.option(
    "--max-queue",
    type=click.IntRange(0),
    default=64,
    show_default=True,
    help="Requests waiting for a batch row; beyond it, 429 with Retry-After.",
)
@click.option(
    "--timeout",
    "request_timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds a request may take, queueing included.",
)
@click.option(
    "--audit",
    "audit_log",
    type=click.Path(path_type=Path),
    help="Append every request's audit record (attention of every layer and head) to this log.",
)
@click.option(
    "--audit-float32", is_flag=True, help="Store audited attention as float32 (exact; ~2x the size)."
)
@click.option(
    "--api-key", help="Require `Authorization: Bearer KEY` (default: $GPTDEPLOY_API_KEY, else no key)."
)
@click.option(
    "--max-body",
    "max_body_bytes",
    type=click.IntRange(1),
    default=1 << 20,
    show_default=True,
    help="Largest request body, in bytes.",
)
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="On SIGTERM, seconds for requests in flight to finish before they are ended.",
)
@click.option(
    "--chat-template", type=click.Path(path_type=Path), help="Jinja chat template instead of the bundle's."
)
@runtime_options
@click.option(
    "--ray", "use_ray", is_flag=True, help="Serve with Ray Serve (the `ray` extra), one engine per replica."
)
@click.option(
    "--replicas",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Ray Serve replicas (with --ray).",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
def serve(
    bundle: Path,
    host: str,
    port: int,
    model: str | None,
    max_batch: int,
    max_queue: int,
    request_timeout: float,
    audit_log: Path | None,
    audit_float32: bool,
    api_key: str | None,
    max_body_bytes: int,
    grace: float,
    chat_template: Path | None,
    backend: str,
    graph: str | None,
    threads: int | None,
    no_verify_hashes: bool,
    use_ray: bool,
    replicas: int,
    log_level: str,
) -> None:
    """Serve BUNDLE over HTTP with OpenAI's API: /v1/completions, /v1/chat/completions, /v1/models,
    /health and /metrics. Stops on SIGTERM or Ctrl-C, giving requests in flight --grace seconds."""
    try:
        from gptdeploy.serve.auth import api_key_from
        from gptdeploy.serve.run import serve as run
        from gptdeploy.serve.service import ServeConfig
    except ModuleNotFoundError as exc:  # the `serve` extra is missing
        raise BackendUnavailable(f"{exc.name} is not installed; pip install 'gptdeploy[serve]'") from None

    config = ServeConfig(
        bundle,
        model=model,
        backend=backend,
        graph=graph,
        threads=threads,
        verify_hashes=not no_verify_hashes,
        max_batch=max_batch,
        max_queue=max_queue,
        request_timeout=request_timeout,
        audit_log=audit_log,
        audit_float32=audit_float32,
        api_key=api_key_from(api_key),
        max_body_bytes=max_body_bytes,
        grace=grace,
        chat_template=chat_template,
    )
    if use_ray:
        from gptdeploy.serve.rayserve import serve_with_ray

        serve_with_ray(config, replicas, host, port, announce=_announce_ray)
        return
    if replicas != 1:
        raise click.BadParameter("--replicas needs --ray", param_hint="--replicas")
    run(config, host, port, log_level, announce=_announce)


def _announce(host: str, port: int, service) -> None:
    shown = f"[{host}]" if ":" in host else host
    engine = service.engine
    notes = [engine.runtime.name, f"batch {engine.max_batch}", f"queue {engine.max_queue}"]
    notes += [f"audit {service.audit.path}"] if service.audit else []
    notes += ["API key required"] if service.config.api_key else []
    click.echo(f"serving {service.model!r} on http://{shown}:{port}/v1 ({', '.join(notes)})", err=True)


def _announce_ray(host: str, port: int, replicas: int, model: str) -> None:
    click.echo(
        f"serving {model!r} on http://{host}:{port}/v1 with Ray Serve, {replicas} replica(s)", err=True
    )
