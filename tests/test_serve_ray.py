"""`gptdeploy serve --ray --replicas 2` on a local Ray cluster: both replicas answer, each request
gets the tokens it gets alone, SIGTERM shuts the replicas down. Slow: Ray takes ~40 s to start on
two cores. Skipped, with the reason, where Ray Serve is not installed (the `ray` extra)."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from gptdeploy import Generator
from tests.runtime_bundles import made
from tests.serve_harness import PROMPTS, httpx, subprocess_server

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'gptdeploy[ray]'")
pytest.importorskip("openai", reason="the serve tests use the openai client: pip install 'gptdeploy[dev]'")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ray_serve_replicas_answer_as_one_server_would():
    bundle = made("small").bundle
    with Generator.load(bundle, threads=1) as gen:
        alone = [gen.generate(p, max_new_tokens=12).text for p in PROMPTS]
    with subprocess_server(
        bundle, "--ray", "--replicas", "2", "--port", str(_free_port()), "--model-name", "tiny"
    ) as live:

        def one(prompt):
            got = live.client().completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
            return got.id, got.choices[0].text

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, PROMPTS * 3))
        assert [text for _, text in answers] == alone * 3
        replicas = {rid.split("-")[1][:8] for rid, _ in answers}  # each replica names its own request ids
        assert len(replicas) == 2, replicas
        assert live.health()["model"] == "tiny"
        metrics = httpx.get(live.url + "/metrics", timeout=30).text  # one replica's, labelled as such
        labels = {ln.split('replica="')[1].split('"')[0] for ln in metrics.splitlines() if 'replica="' in ln}
        assert len(labels) == 1, labels
        live.process.terminate()
        assert live.process.wait(120) == 0
