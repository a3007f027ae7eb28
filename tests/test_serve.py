"""`gptdeploy serve` through the official `openai` client on 127.0.0.1: completions, chat,
streaming, models, metrics, the API key, and every kind of bad request answered in OpenAI's
error shape (never a 500 or a traceback). Faults and load: test_serve_faults.py."""

from __future__ import annotations

import json
import socket

import pytest

from gptdeploy import Generator
from gptdeploy.chat import ChatTemplate, prompt_ids
from gptdeploy.serve.service import ServeConfig
from tests.runtime_bundles import made
from tests.serve_harness import CHAT_TEMPLATE, PROMPTS, httpx, in_process, subprocess_server

openai = pytest.importorskip(
    "openai", reason="the serve tests use the openai client: pip install 'gptdeploy[dev]'"
)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "template.jinja"
    path.write_text(CHAT_TEMPLATE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gen():
    with Generator.load(made("small").bundle, threads=1) as g:
        yield g


@pytest.fixture(scope="module")
def live(template_file):
    config = ServeConfig(
        made("small").bundle, model="tiny", threads=1, chat_template=template_file, max_body_bytes=4096
    )
    with in_process(config) as server:
        yield server


def test_completions_plain_and_streamed_are_the_generators_text(live, gen):
    client = live.client()
    want = gen.generate(PROMPTS[0], max_new_tokens=24)
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids) and got.usage.completion_tokens == 24
    assert got.id.startswith("cmpl-") and got.object == "text_completion" and got.model == "tiny"
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPTS[0],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].choices == []
    sampled = gen.generate(
        PROMPTS[1], max_new_tokens=16, temperature=1.0, seed=42
    )  # OpenAI's default temperature
    assert (
        client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, seed=42).choices[0].text
        == sampled.text
    )
    batch = client.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=8, temperature=0)
    assert [c.text for c in batch.choices] == [r.text for r in gen.generate(PROMPTS[:3], max_new_tokens=8)]
    stopped = client.completions.create(
        model="tiny", prompt=[1, 2, 3], max_tokens=8, temperature=0, stop=["e"]
    )
    assert "e" not in stopped.choices[0].text


def test_chat_plain_and_streamed_follow_the_template(live, gen, template_file):
    client = live.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    ids = prompt_ids(gen.tokenizer, ChatTemplate.from_file(template_file).render(messages))
    want = gen.generate_ids([ids], max_new_tokens=20)[0]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.object == "chat.completion" and got.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=20, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    parts = [{"role": "user", "content": [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}]}]
    assert (
        client.chat.completions.create(
            model="tiny",
            messages=parts,
            max_tokens=20,
            temperature=0,
        )
        .choices[0]
        .message.content
        == gen.generate_ids(
            [
                prompt_ids(
                    gen.tokenizer,
                    ChatTemplate.from_file(template_file).render([{"role": "user", "content": "你好"}]),
                )
            ],
            max_new_tokens=20,
        )[0].text
    )


def test_models_health_and_metrics(live):
    client = live.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert live.health() == {"status": "ok", "model": "tiny", "queued": 0, "running": 0}
    client.completions.create(model="tiny", prompt="hi", max_tokens=3)
    text = httpx.get(live.url + "/metrics").text
    for name in (
        "gptdeploy_requests_total",
        "gptdeploy_generated_tokens_total",
        "gptdeploy_time_to_first_token_seconds_bucket",
        "gptdeploy_time_per_output_token_seconds_bucket",
        "gptdeploy_queue_depth",
        "gptdeploy_batch_size",
        "gptdeploy_decode_batch_size_bucket",
    ):
        assert name in text, name
    assert 'gptdeploy_requests_total{endpoint="completions",outcome="ok"}' in text


BAD = [
    # (body or raw bytes, status, param, code)
    (b'{"model": "tiny", "prompt": ', 400, None, "invalid_json"),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, None),
    ({"model": "tiny"}, 400, "prompt", "missing_required_parameter"),
    ({"model": "tiny", "prompt": "x", "colour": "red"}, 400, "colour", "unknown_parameter"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "ten"}, 422, "max_tokens", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 422, "max_tokens", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 1000}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": "tiny", "prompt": "word " * 150, "max_tokens": 1}, 400, "prompt", "context_length_exceeded"),
    ({"model": "tiny", "prompt": "x", "temperature": True}, 422, "temperature", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "top_p": 1.5}, 422, "top_p", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "stop": [""]}, 422, "stop", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n", "unsupported"),
    ({"model": "tiny", "prompt": "", "max_tokens": 1}, 400, None, None),
    ({"model": "tiny", "prompt": [[1, 99999]]}, 400, None, None),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ({"model": "../../etc/passwd", "prompt": "x"}, 404, "model", "model_not_found"),
    ({"model": "tiny", "prompt": "x" * 5000}, 413, None, "request_too_large"),
]


@pytest.mark.parametrize("body, status, param, code", BAD)
def test_bad_requests_get_openai_error_bodies(live, body, status, param, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(live.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "Traceback" not in r.text
    assert (err["param"], err["code"]) == (param, code)


def test_bad_chat_requests_and_routes(live):
    post = lambda body: httpx.post(live.url + "/v1/chat/completions", json=body)
    r = post({"model": "tiny", "messages": []})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages"
    r = post(
        {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported"
    r = post(
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert httpx.get(live.url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(live.url + "/v1/completions").status_code == 405
    client = live.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="Lower max_tokens"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=500
        )


def test_a_request_of_many_pieces_is_read_to_its_limit(live):
    """A chunked body with no Content-Length: the limit holds while it is read."""
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):
            s.sendall(b"400\r\n" + b" " * 1024 + b"\r\n")
        s.sendall(b"0\r\n\r\n")
        assert b" 413 " in s.recv(4096).split(b"\r\n")[0] + b" "


def test_api_key_is_required_when_set_and_health_stays_open(tmp_path):
    bundle = made("small").bundle
    with subprocess_server(bundle, env={"GPTDEPLOY_API_KEY": "s3cret"}) as live:
        with pytest.raises(openai.AuthenticationError):
            live.client().completions.create(model=bundle.name, prompt="x", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            live.client("s3cret-not").models.list()
        assert httpx.get(live.url + "/metrics").status_code == 401
        assert (
            live.client("s3cret")
            .completions.create(model=bundle.name, prompt="x", max_tokens=2)
            .usage.completion_tokens
            == 2
        )
        assert live.health()["status"] == "ok"


def test_cli_refuses_what_it_cannot_serve(tmp_path):
    from click.testing import CliRunner

    from gptdeploy.cli import cli

    def run(*args):
        r = CliRunner().invoke(cli, ["serve", *map(str, args)])
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
        return lines[0]

    assert "exported with --no-attentions" in run(
        made("small", attentions=False).bundle, "--audit", tmp_path / "a.log"
    )
    assert "does not exist" in run(tmp_path / "none")
    assert "--replicas needs --ray" in run(made("small").bundle, "--replicas", "2")
    assert "must be non-empty" in run(made("small").bundle, "--api-key", "")


def test_it_binds_loopback_unless_told():
    """(subprocess_server passes no --host and finds the server on 127.0.0.1, in the test above)"""
    from gptdeploy.cli.serve import serve

    assert next(p for p in serve.params if p.name == "host").default == "127.0.0.1"


def test_a_chat_prompt_over_the_context_blames_messages(live):
    r = httpx.post(
        live.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "word " * 150}]},
    )
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("messages", "context_length_exceeded")


# ------------------------------------------------------------------- pieces, without a server


def test_stream_events_escape_the_line_breaks_other_splitters_see():
    from gptdeploy.serve.shapes import event

    text = "a\u2028b\u2029c\u0085d\n你好"
    data = event({"text": text})
    lines = data.decode().splitlines()  # what httpx's iter_lines does: more breaks than SSE's
    assert lines == [lines[0], ""] and data.endswith(b"\n\n")
    assert json.loads(lines[0].removeprefix("data: "))["text"] == text
    assert "你好".encode() in data  # everything else stays UTF-8, not \u-escaped


def test_metrics_of_a_replica_carry_its_id_on_every_series():
    from gptdeploy.serve.metrics import Metrics

    metrics = Metrics(lambda: (1, 2), replica="r7")
    metrics.answered("completions", "ok")
    metrics.step(2, 0.001)
    samples = [ln for ln in metrics.render()[0].decode().splitlines() if ln.startswith("gptdeploy_")]
    assert samples and all('replica="r7"' in ln for ln in samples), samples
    alone = Metrics(lambda: (0, 0)).render()[0].decode()
    assert "replica" not in alone  # one server: no label


def test_the_api_key_never_shows_in_the_config_repr():
    config = ServeConfig(made("small").bundle, api_key="s3cret-key")
    assert "s3cret" not in repr(config) and config.api_key == "s3cret-key"


def test_a_service_that_fails_to_start_closes_its_engine(tmp_path):
    from gptdeploy.engine import Engine
    from gptdeploy.errors import GptDeployError
    from gptdeploy.serve.service import Service

    engine = Engine.load(made("small").bundle, threads=1)
    with pytest.raises(GptDeployError, match="is a directory"):
        Service(ServeConfig(made("small").bundle, audit_log=tmp_path), engine)
    assert engine.runtime._closed
    with pytest.raises(GptDeployError, match="closed"):
        engine.submit("x", max_new_tokens=1)


# ------------------------------------------------------------------- Ray Serve's builder


def test_ray_builder_arguments_are_typed_checked_and_resolved(tmp_path, monkeypatch):
    from dataclasses import fields

    from gptdeploy.errors import GptDeployError
    from gptdeploy.serve.rayserve import FIELDS, config_from_args

    assert set(FIELDS) == {f.name for f in fields(ServeConfig)} - {"bundle"}  # one parser per field
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTDEPLOY_API_KEY", "from-env")
    (tmp_path / "t.jinja").write_text("x")
    config, replicas = config_from_args(
        {"bundle": "b", "replicas": "2", "max_batch": "4", "audit_log": "a.log", "chat_template": "t.jinja",
         "verify_hashes": "false", "request_timeout": "none", "grace": 2}
    )
    assert replicas == 2 and config.max_batch == 4 and config.verify_hashes is False
    assert config.request_timeout is None and config.grace == 2.0
    assert config.bundle == tmp_path / "b" and config.audit_log == tmp_path / "a.log"
    assert config.chat_template == tmp_path / "t.jinja"
    assert config.api_key == "from-env"  # GPTDEPLOY_API_KEY, as `gptdeploy serve` reads it
    assert config_from_args({"bundle": "b", "api_key": "given"})[0].api_key == "given"
    with pytest.raises(GptDeployError, match="unknown argument.*max_batchh"):
        config_from_args({"bundle": "b", "max_batchh": "4"})
    with pytest.raises(GptDeployError, match="max_batch='four'"):
        config_from_args({"bundle": "b", "max_batch": "four"})
    with pytest.raises(GptDeployError, match="verify_hashes"):
        config_from_args({"bundle": "b", "verify_hashes": "maybe"})
    with pytest.raises(GptDeployError, match="bundle=DIR"):
        config_from_args({"replicas": "2"})
    monkeypatch.setenv("GPTDEPLOY_API_KEY", "")
    with pytest.raises(GptDeployError, match="must be non-empty"):
        config_from_args({"bundle": "b"})


def test_ray_replicas_reserve_the_cpus_their_threads_use():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'gptdeploy[ray]'")
    from gptdeploy.machine import physical_cores
    from gptdeploy.serve.rayserve import application

    bundle = made("small").bundle
    given = application(ServeConfig(bundle, threads=3, grace=7), replicas=2)._bound_deployment
    assert given.ray_actor_options["num_cpus"] == 3
    assert given._deployment_config.graceful_shutdown_timeout_s == 12.0
    shared = application(ServeConfig(bundle), replicas=2)._bound_deployment
    assert shared.ray_actor_options["num_cpus"] == max(1, physical_cores() // 2)
