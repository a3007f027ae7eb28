"""Live servers for the serve tests, on 127.0.0.1 only: in-process (uvicorn on a thread, an engine
the test may slow down) or as a `gptdeploy serve` subprocess (for signals and the CLI)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'gptdeploy[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'gptdeploy[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve tests use httpx: pip install 'gptdeploy[dev]'")

from gptdeploy.engine import Engine, EngineLimits
from gptdeploy.serve.app import build_app
from gptdeploy.serve.run import listen
from gptdeploy.serve.service import ServeConfig, Service
from tests.engine_waits import step_delay

# A chat template in the characters the test tokenizer knows (its corpus is English and Chinese).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# Prompts in the test tokenizer's characters, English and Chinese, that every serve test module uses.
PROMPTS = [
    "The quick brown fox",
    "你好，世界。",
    "A deploy bundle",
    "今天天气",
    "Numbers 0123",
    "注意力",
    "Attention is",
    "quotes",
]


@dataclass
class Live:
    url: str  # http://127.0.0.1:PORT
    service: Service | None = None  # in-process only
    process: subprocess.Popen | None = None  # subprocess only
    log: list[str] | None = None  # a subprocess's stderr lines after the first

    def client(self, api_key: str = "unused", **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def until(self, condition, seconds: float = 10.0) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if condition(self.health()):
                return True
            time.sleep(0.01)
        return False


@contextlib.contextmanager
def in_process(config: ServeConfig, delay: float = 0.0):
    """uvicorn on a thread over `config`; with `delay`, every decode step is that much slower."""
    import uvicorn

    engine = None
    if delay:
        engine = Engine.load(
            config.bundle,
            threads=1,
            limits=EngineLimits(config.max_batch, config.max_queue),
            on_step=step_delay(delay),
        )
    service = Service(config, engine)
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(build_app(service), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < end:
        time.sleep(0.01)
    try:
        yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", service=service)
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def subprocess_server(bundle: Path, *args: str, env: dict | None = None):
    """`gptdeploy serve BUNDLE --port 0 ARGS` in a child process; stopped (SIGTERM) at the end."""
    cmd = [
        sys.executable,
        "-c",
        "from gptdeploy.cli import main; main()",
        "serve",
        str(bundle),
        "--port",
        "0",
        "--threads",
        "1",
        "--log-level",
        "warning",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}
    )
    seen = []
    for line in proc.stderr:  # up to the announcement (Ray logs before it); EOF if the server failed
        seen.append(line)
        if found := re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/v1", line):
            break
    else:
        proc.kill()
        raise AssertionError("the server did not start: " + "".join(seen[-20:]))
    log: list[str] = []  # the rest of stderr, read on so that the child never blocks on a full pipe
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        yield Live(f"http://127.0.0.1:{found.group(1)}", process=proc, log=log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
