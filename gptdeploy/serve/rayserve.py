"""Beyond one machine: the same engine and HTTP app as a Ray Serve deployment. A replica is one
Service (one engine, one batch) and holds no state between requests, so scaling out is more
replicas behind Ray's HTTP proxy, which routes each request to one of them.

    gptdeploy serve out/sample --ray --replicas 2 --port 8000
    serve run gptdeploy.serve.rayserve:build bundle=out/sample replicas=2     # Ray's own CLI

Needs the `ray` extra (ray[serve]). Replicas on one machine may share an --audit log (appends
take the log's file lock); replicas on several machines need a log path on each.

- CPUs: each replica reserves as many Ray CPUs as onnxruntime threads it runs (--threads; by
  default this machine's physical cores shared out among the replicas).
- Metrics: every series carries `replica` (Ray's replica id). A scrape of /metrics through Ray's
  proxy reaches one replica, so each scrape shows one replica's series (README, Serving).
- Shutdown: Ray stops routing to a replica, waits for its requests in flight (at most
  graceful_shutdown_timeout_s = --grace + 5 s, then kills it) and then calls the replica's
  destructor, which serve.ingress uses to run the ASGI lifespan's shutdown: service.close().
  Ray offers no hook when its drain starts, so unlike `gptdeploy serve` a request still running
  when Ray gives up is cut off rather than ended with a "shutting down" error.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from gptdeploy.errors import BackendUnavailable, GptDeployError
from gptdeploy.machine import physical_cores
from gptdeploy.serve.auth import api_key_from
from gptdeploy.serve.service import ServeConfig

INSTALL = "pip install 'gptdeploy[ray]'"
MARGIN_S = 5.0  # Ray's kill deadline past the grace period: time for the lifespan shutdown


def _serve_module():
    try:
        from ray import serve
    except ImportError as exc:
        raise BackendUnavailable(f"Ray Serve is not installed ({exc}); {INSTALL}") from None
    return serve


def application(config: ServeConfig, replicas: int = 1):
    """The Ray Serve application: `replicas` copies of the gptdeploy app, each with its own engine
    running `config.threads` onnxruntime threads on as many CPUs reserved from Ray."""
    serve = _serve_module()
    from gptdeploy.serve.app import build_app
    from gptdeploy.serve.run import log_to_stderr
    from gptdeploy.serve.service import Service

    config = replace(config, threads=config.threads or max(1, physical_cores() // replicas))

    def replica_app():  # run on each replica as it starts: its own engine, its metrics labelled
        log_to_stderr("info")  # into the replica's log file
        replica = serve.get_replica_context().replica_tag
        return build_app(Service(config, replica=replica))  # the lifespan closes the service at shutdown

    @serve.deployment(
        name="gptdeploy",
        num_replicas=replicas,
        graceful_shutdown_timeout_s=config.grace + MARGIN_S,
        ray_actor_options={"num_cpus": config.threads},
        max_ongoing_requests=config.max_batch + config.max_queue,
    )
    @serve.ingress(replica_app)
    class GptDeploy:
        pass

    return GptDeploy.bind()


def build(args: dict):
    """The builder for Ray's `serve run gptdeploy.serve.rayserve:build bundle=DIR [replicas=N] [KEY=VALUE]`,
    KEY any ServeConfig field (model, max_batch, max_queue, audit_log, threads, ...). The API key
    is api_key=KEY or, as for `gptdeploy serve`, GPTDEPLOY_API_KEY."""
    config, replicas = config_from_args(args)
    return application(config, replicas)


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ValueError("not true or false")


def _seconds(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


# How each `serve run` argument (a string) becomes its ServeConfig field; one entry per field.
FIELDS: dict[str, Callable[[str], object]] = {
    "model": str,
    "backend": str,
    "graph": str,
    "threads": int,
    "verify_hashes": _flag,
    "max_batch": int,
    "max_queue": int,
    "request_timeout": _seconds,
    "audit_log": Path,
    "audit_float32": _flag,
    "api_key": str,
    "max_body_bytes": int,
    "grace": float,
    "chat_template": Path,
}


def config_from_args(args: dict) -> tuple[ServeConfig, int]:
    """`build`'s arguments as a ServeConfig (paths absolute) and the number of replicas."""
    args = {k: str(v) for k, v in args.items()}  # a Ray config file may give numbers and booleans
    unknown = sorted(set(args) - {"bundle", "replicas", *FIELDS})
    if unknown:
        raise GptDeployError(
            f"unknown argument(s) {', '.join(unknown)}; give bundle=DIR, replicas=N and any of "
            f"{', '.join(FIELDS)}"
        )
    if "bundle" not in args:
        raise GptDeployError("give the bundle: serve run gptdeploy.serve.rayserve:build bundle=DIR")
    replicas = _parse("replicas", args.pop("replicas", "1"), int)
    if replicas < 1:
        raise GptDeployError(f"replicas must be >= 1, got {replicas}")
    fields = {k: _parse(k, v, FIELDS[k]) for k, v in args.items() if k != "bundle"}
    fields["api_key"] = api_key_from(fields.get("api_key"))
    return resolved(ServeConfig(Path(args["bundle"]), **fields)), replicas


def _parse(name: str, value: str, convert: Callable[[str], object]):
    try:
        return convert(value)
    except ValueError as exc:
        raise GptDeployError(f"argument {name}={value!r} is not valid ({exc})") from None


def resolved(config: ServeConfig) -> ServeConfig:
    """The config with absolute paths: a replica's working directory is not the caller's."""
    def absolute(path: Path | None) -> Path | None:
        return None if path is None else Path(path).resolve()

    return replace(
        config,
        bundle=Path(config.bundle).resolve(),
        audit_log=absolute(config.audit_log),
        chat_template=absolute(config.chat_template),
    )


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

    config = resolved(config)
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
