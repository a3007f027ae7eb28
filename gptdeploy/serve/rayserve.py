"""Beyond one machine: the same engine and HTTP app as a Ray Serve deployment. A replica is one
Service (one engine, one batch) and holds no state between requests, so scaling out is more
replicas behind Ray's HTTP proxy, which routes each request to one of them.

    gptdeploy serve out/sample --ray --replicas 2 --port 8000
    serve run gptdeploy.serve.rayserve:build bundle=out/sample replicas=2     # Ray's own CLI

Needs the `ray` extra (ray[serve]). Replicas on one machine may share an --audit log (appends
take the log's file lock); replicas on several machines need a log path on each.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

from gptdeploy.errors import BackendUnavailable
from gptdeploy.serve.service import ServeConfig

INSTALL = "pip install 'gptdeploy[ray]'"


def _serve_module():
    try:
        from ray import serve
    except ImportError as exc:
        raise BackendUnavailable(f"Ray Serve is not installed ({exc}); {INSTALL}") from None
    return serve


def application(config: ServeConfig, replicas: int = 1):
    """The Ray Serve application: `replicas` copies of the gptdeploy app, each with its own engine."""
    serve = _serve_module()
    from gptdeploy.serve.app import build_app
    from gptdeploy.serve.service import Service

    def replica_app():  # run on each replica as it starts: its own engine
        return build_app(Service(config))  # the app's lifespan closes the service when the replica stops

    @serve.deployment(
        name="gptdeploy",
        num_replicas=replicas,
        graceful_shutdown_timeout_s=config.grace + 5,
        ray_actor_options={"num_cpus": config.threads or 1},
        max_ongoing_requests=config.max_batch + config.max_queue,
    )
    @serve.ingress(replica_app)
    class GptDeploy:
        pass

    return GptDeploy.bind()


def build(args: dict):
    """The builder for Ray's `serve run gptdeploy.serve.rayserve:build bundle=DIR [replicas=N] [KEY=VALUE]`,
    KEY any ServeConfig field (model, max_batch, max_queue, audit_log, threads, ...)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    bundle = Path(args.pop("bundle"))
    fields = ServeConfig.__dataclass_fields__
    typed = {k: _typed(fields[k].type, v) for k, v in args.items()}
    return application(ServeConfig(bundle, **typed), replicas)


def _typed(annotation: str, value: str):
    """A `serve run` argument (a string) as the ServeConfig field annotated `annotation` takes it."""
    for name, convert in (
        ("Path", Path),
        ("bool", lambda v: v.lower() in ("1", "true", "yes")),
        ("int", int),
        ("float", float),
    ):
        if name in annotation:
            return convert(value)
    return value


def serve_with_ray(
    config: ServeConfig,
    replicas: int,
    host: str,
    port: int,
    announce: Callable[[str, int, int, str], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Start a local Ray (or join RAY_ADDRESS's cluster), run the application, serve until SIGTERM,
    Ctrl-C or `stop`, then shut the replicas down (each finishes its requests within the grace)."""
    serve = _serve_module()
    import ray

    config = ServeConfig(
        **{
            **config.__dict__,
            "bundle": Path(config.bundle).resolve(),
            "audit_log": Path(config.audit_log).resolve() if config.audit_log else None,
        }
    )
    stop = stop or threading.Event()
    ray.init(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    if threading.current_thread() is threading.main_thread():  # after ray.init, which installs its own
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(config, replicas), name="gptdeploy", route_prefix="/", blocking=False)
        if announce is not None:
            announce(host, port, replicas, config.model or config.bundle.name)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
