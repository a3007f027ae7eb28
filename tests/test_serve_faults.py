"""The server under concurrency and faults, on 127.0.0.1: concurrent clients get what they get
alone, a client that disconnects frees its batch row at once, 429 when the queue is full, the
per-request timeout, an audit log written under load that verifies, SIGTERM with requests in
flight, and a bounded load loop with cancellations that accounts for every request."""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gptdeploy import Generator
from gptdeploy.audit.record import read_records
from gptdeploy.audit.verify import verify
from gptdeploy.serve.service import ServeConfig
from tests.runtime_bundles import made
from tests.serve_harness import PROMPTS as SERVE_PROMPTS
from tests.serve_harness import httpx, in_process, subprocess_server

openai = pytest.importorskip(
    "openai", reason="the serve tests use the openai client: pip install 'gptdeploy[dev]'"
)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    *SERVE_PROMPTS,
    "The lazy dog",
    "我们一起学习",
    "tabs and spaces",
    "brackets",
]


def _config(**kw) -> ServeConfig:
    return ServeConfig(made("small").bundle, model="tiny", threads=1, **kw)


def _stream_first_line(url: str, body: dict) -> socket.socket:
    """A raw streaming request whose first event has arrived; the caller closes it (disconnects)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
    )
    if body.get("stream"):
        assert b"200 OK" in s.recv(65536)
    return s


def test_concurrent_clients_get_what_they_get_alone():
    with Generator.load(made("small").bundle, threads=1) as gen, in_process(_config()) as live:
        jobs = [(p, 4 + 3 * i, i) for i, p in enumerate(PROMPTS[:8])]
        alone = [gen.generate(p, max_new_tokens=n, temperature=1.0, seed=seed).text for p, n, seed in jobs]

        def one(job):
            p, n, seed = job
            client = live.client()
            if seed % 2:  # half stream, half not
                chunks = client.completions.create(
                    model="tiny", prompt=p, max_tokens=n, seed=seed, stream=True
                )
                return "".join(c.choices[0].text for c in chunks)
            return client.completions.create(model="tiny", prompt=p, max_tokens=n, seed=seed).choices[0].text

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, jobs)) == alone
        text = httpx.get(live.url + "/metrics").text
        assert "gptdeploy_decode_batch_size_bucket" in text


def test_a_client_that_disconnects_frees_its_row_at_once():
    with in_process(_config(), delay=0.02) as live:  # 120 tokens would take > 2.4 s
        for stream in (True, False):
            s = _stream_first_line(
                live.url, {"model": "tiny", "prompt": "x", "max_tokens": 120, "stream": stream, "seed": 1}
            )
            assert live.until(lambda h: h["running"] == 1)
            gone = time.monotonic()
            s.close()
            assert live.until(lambda h: h["running"] == 0, 1.0)
            assert time.monotonic() - gone < 1.0
        end = time.monotonic() + 5.0  # the handlers record the outcome after the rows free
        while _counter(text := httpx.get(live.url + "/metrics").text, "cancelled") < 2 and time.monotonic() < end:
            time.sleep(0.02)
        assert 'gptdeploy_requests_total{endpoint="completions",outcome="cancelled"} 2.0' in text


def test_a_full_queue_answers_429_with_retry_after():
    with in_process(_config(max_batch=1, max_queue=1), delay=0.02) as live:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 100, "stream": True, "seed": 1}
        running = _stream_first_line(live.url, body)
        waiting = _stream_first_line(live.url, {**body, "stream": False})
        assert live.until(lambda h: (h["queued"], h["running"]) == (1, 1))
        r = httpx.post(live.url + "/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            live.client().completions.create(model="tiny", prompt="x", max_tokens=2)
        running.close()
        waiting.close()
        assert live.until(lambda h: (h["queued"], h["running"]) == (0, 0), 2.0)


# Requests that must still be running when something happens to them sample with seed 1: the
# tiny model, sampled at temperature 1, ends some generations on EOS within 10-16 tokens (3 of 40
# seeds), which made these tests fail now and then; with seed 1 it writes 120 tokens of text
# (greedy, it repeats tokens whose text is held back, so a stream sends few events).


def test_the_request_timeout_ends_a_request():
    with in_process(_config(request_timeout=0.3), delay=0.02) as live:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 100, "seed": 1}
        r = httpx.post(live.url + "/v1/completions", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with pytest.raises(openai.APIError, match="timed out"):
            list(live.client().completions.create(**body, stream=True))
        assert live.until(lambda h: h["running"] == 0, 2.0)


def test_audit_log_written_under_concurrent_load_verifies(tmp_path):
    log = tmp_path / "audit.log"
    with in_process(_config(audit_log=log, max_batch=4)) as live:

        def one(i):
            client = live.client()
            kw = {"model": "tiny", "prompt": PROMPTS[i], "max_tokens": 3 + i, "seed": i}
            if i % 2:
                last = list(client.completions.create(stream=True, **kw))[-1]
                return PROMPTS[i], last.model_extra["audit_record"]
            return PROMPTS[i], client.completions.create(**kw).model_extra["audit_record"]

        with ThreadPoolExecutor(8) as pool:
            answered = list(pool.map(one, range(len(PROMPTS))))
    report = verify(log)
    assert report.ok and report.intact == len(PROMPTS), report
    records = {r.sha256: r for r in read_records(log)}
    assert sorted(r.index for r in records.values()) == list(range(len(PROMPTS)))
    for prompt, rid in answered:
        rec = records[rid["sha256"]]
        assert rec.index == rid["index"] and rec.prompt.text == prompt
        assert rec.attention[0].shape[-1] == rec.positions


def test_sigterm_finishes_or_ends_requests_in_flight_and_leaves_the_audit_log_verifiable(tmp_path):
    log = tmp_path / "audit.log"
    # 16 requests of 110 tokens, one at a time: a second of work or more (~0.5 ms a step on a quiet
    # machine, measured 1-2 ms on a loaded one); 0.2 s of grace ends part of it.
    with subprocess_server(
        made("small").bundle,
        "--audit",
        str(log),
        "--grace",
        "0.2",
        "--max-batch",
        "1",
        "--model-name",
        "tiny",
    ) as live:
        outcomes: list[str] = []

        def one(i):
            try:
                chunks = live.client().completions.create(
                    model="tiny", prompt=PROMPTS[i % 12], max_tokens=110, stream=True
                )
                outcomes.append([c for c in chunks if c.choices][-1].choices[0].finish_reason)
            except openai.APIError as exc:  # ended by the grace period, or refused while draining
                outcomes.append(type(exc).__name__ + ": " + str(exc)[:80])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        assert live.until(lambda h: h["running"] >= 1)
        live.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert live.process.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(live.url + "/health")
    finished = [o for o in outcomes if o in ("length", "stop")]
    ended = [o for o in outcomes if "shutting down" in o]
    assert len(finished) + len(ended) == 16 and ended, outcomes
    report = verify(log)  # a record for each request that finished, none torn
    assert report.ok and report.intact == len(finished)


def test_a_bounded_load_loop_with_cancellations_accounts_for_every_request():
    rng = random.Random(1)
    plan = [(rng.choice(PROMPTS), rng.randint(1, 40), rng.random() < 0.3) for _ in range(40)]
    with in_process(_config(max_batch=4, max_queue=100)) as live:

        def one(job):
            prompt, n, cancel = job
            with httpx.stream(
                "POST",
                live.url + "/v1/completions",
                timeout=60,
                json={"model": "tiny", "prompt": prompt, "max_tokens": n, "stream": True},
            ) as r:
                for line in r.iter_lines():
                    if cancel:
                        return "cancelled"  # leaving the block closes the connection
                    if line == "data: [DONE]":
                        return "ok"
            return "incomplete"

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(one, plan))
        assert live.until(lambda h: (h["queued"], h["running"]) == (0, 0), 5.0)
        text = httpx.get(live.url + "/metrics").text
    assert "incomplete" not in outcomes
    served = _counter(text, "ok")  # a client that left after the last token may still count as served
    assert served >= outcomes.count("ok")
    assert served + _counter(text, "cancelled") == len(
        plan
    )  # each request counted once: none lost or doubled


def _counter(text: str, outcome: str) -> int:
    line = f'gptdeploy_requests_total{{endpoint="completions",outcome="{outcome}"}} '
    found = [ln for ln in text.splitlines() if ln.startswith(line)]
    return int(float(found[0].split()[-1])) if found else 0


# ------------------------------------------------------------------ the server's own faults


def _boom(*args):
    raise RuntimeError("boom at 0x7f3a")


def test_a_runtime_failure_is_a_500_whose_detail_stays_in_the_log(caplog):
    with in_process(_config()) as live:
        runtime = live.service.engine.runtime
        decode, runtime._decode = runtime._decode, _boom
        body = {"model": "tiny", "prompt": "The quick", "max_tokens": 5}
        r = httpx.post(live.url + "/v1/completions", json=body)
        assert r.status_code == 500, r.text
        assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "internal_error"
        assert "boom" not in r.text and "0x7f3a" not in r.text
        with pytest.raises(openai.InternalServerError):
            live.client().completions.create(model="tiny", prompt="x", max_tokens=2)
        with httpx.stream("POST", live.url + "/v1/completions", json={**body, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["type"] == "server_error" and "boom" not in json.dumps(events)
        assert "boom at 0x7f3a" in caplog.text  # the operator sees it
        runtime._decode = decode
        assert httpx.post(live.url + "/v1/completions", json=body).status_code == 200
        assert live.health()["status"] == "ok"
        text = httpx.get(live.url + "/metrics").text
        assert _counter(text, "500") == 3


def test_an_audit_log_that_cannot_be_written_is_a_500(tmp_path):
    from gptdeploy.errors import AuditError

    with in_process(_config(audit_log=tmp_path / "audit.log")) as live:

        def full(*args):
            raise AuditError("cannot append to audit.log: No space left on device")

        live.service.audit._append = full
        r = httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and "space" not in r.text


def test_an_engine_that_cannot_recover_reports_unhealthy_and_refuses_with_503():
    with in_process(_config()) as live:
        runtime = live.service.engine.runtime
        reset = runtime.reset
        runtime._decode, runtime.reset = _boom, lambda: _boom()
        r = httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 5})
        assert r.status_code == 500
        health = httpx.get(live.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        r = httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 5})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
        runtime.reset = reset


def test_a_client_that_leaves_a_stream_still_counts_the_tokens_it_was_given():
    # 50 ms a step: the 100 tokens take 5 s, so the request is still running when the client leaves
    # after 10, even on a loaded machine (at 10 ms one ran to the end first and counted as finished).
    with in_process(_config(), delay=0.05) as live:
        with httpx.stream(
            "POST",
            live.url + "/v1/completions",
            json={"model": "tiny", "prompt": "The quick", "max_tokens": 100, "stream": True, "seed": 1},
            timeout=30,
        ) as r:
            read = 0
            for line in r.iter_lines():
                read += line.startswith("data: {")
                if read == 10:
                    break
        assert live.until(lambda h: h["running"] == 0, 5.0)
        # The row frees before the HTTP handler records the outcome (it notices the disconnect on
        # its next send): wait for the count, bounded, rather than read it once.
        end = time.monotonic() + 5.0
        while _counter(text := httpx.get(live.url + "/metrics").text, "cancelled") == 0 and time.monotonic() < end:
            time.sleep(0.02)
    assert _counter(text, "cancelled") == 1
    assert _value(text, "gptdeploy_generated_tokens_total") >= 10
    assert _value(text, "gptdeploy_time_to_first_token_seconds_count") == 1
    assert _value(text, "gptdeploy_prompt_tokens_total") > 0


def _value(text: str, name: str) -> float:
    return float(next(ln for ln in text.splitlines() if ln.startswith(name + " ")).split()[-1])
