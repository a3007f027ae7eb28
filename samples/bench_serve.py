"""Benchmark and soak `gptdeploy serve` over HTTP, as its clients see it.

    python samples/bench_serve.py out/sample                       # starts its own server
    python samples/bench_serve.py out/sample --url http://127.0.0.1:8000 --model sample
    python samples/bench_serve.py out/sample --requests 4 --soak 60 # a short run
    python samples/bench_serve.py BUNDLE --prompt-tokens 32 --max-tokens 128 --soak 0     # the issue's load
    python samples/bench_serve.py BUNDLE --url http://127.0.0.1:8080 --model m --prompt-tokens 32 \
        --max-tokens 128 --soak 0 --ignore-eos                          # llama-server, same load

1. one client alone, then 8 (--clients) at once, each sending --requests streamed completions of
   --max-tokens tokens: aggregate generated tokens/s, and p50/p99 of time to first token and of
   the time between tokens (each SSE chunk is a token's text; held-back partial characters make
   fewer, larger chunks, whose gaps then count whole);
2. the soak: --soak requests (500) from --soak-clients (16) concurrent clients, random lengths,
   a share (--cancel) cancelled after a random number of chunks. Every request must end exactly
   once (finished, or cancelled by its client), the server must count each exactly once
   (/metrics), and the server's peak RSS while the last 100 requests ran must be within 10% of
   its peak while the first 100 ran.
Talks to 127.0.0.1 only; every loop is bounded by its request count. Exit code 1 if a soak check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

PROMPTS = [
    "我喜欢",
    "他喜欢吃",
    "Once upon a time",
    "高军说：",
    "小玲每天早上",
    "今天天气很好。",
    "有一天，",
    "你好",
]


@dataclass
class Outcome:
    tag: int
    status: str  # "ok" | "cancelled" | "error: ..."
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    rid: str | None = None


# --ignore-eos: {"ignore_eos": True}, llama-server's field (gptdeploy refuses unknown fields)
EXTRA: dict = {}


def request(
    url: str,
    model: str,
    tag: int,
    prompt: str | list[int],
    max_tokens: int,
    cancel_after: int | None,
    client: httpx.Client,
) -> Outcome:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **EXTRA,
    }
    out, t0, last, chunks = Outcome(tag, "error: no [DONE]"), time.perf_counter(), None, 0
    try:
        with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return Outcome(tag, f"error: HTTP {r.status_code} {r.read()[:100]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.status = "ok"
                    break
                data = json.loads(line[6:])
                if "error" in data:
                    out.status = f"error: {data['error']['message'][:80]}"
                    break
                out.rid = data.get("id")
                if data.get("usage"):
                    out.tokens = data["usage"]["completion_tokens"]
                if data["choices"] and data["choices"][0]["text"]:
                    now = time.perf_counter()
                    if last is None:
                        out.ttft = now - t0
                    else:
                        out.gaps.append(now - last)
                    last, chunks = now, chunks + 1
                    if cancel_after is not None and chunks >= cancel_after:
                        out.status = "cancelled"  # leaving the block closes the connection
                        break
    except httpx.HTTPError as exc:
        out.status = f"error: {type(exc).__name__}: {exc}"
    if not out.tokens:  # no usage chunk: one streamed chunk per token (llama-server)
        out.tokens = chunks
    return out


def phase(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    """`clients` threads, each sending `per_client` requests one after another."""
    jobs = [
        (c * per_client + i, PROMPTS[(c + i) % len(PROMPTS)])
        for c in range(clients)
        for i in range(per_client)
    ]
    t0 = time.perf_counter()
    with httpx.Client() as client, ThreadPoolExecutor(clients) as pool:
        outs = list(pool.map(lambda j: request(url, model, j[0], j[1], max_tokens, None, client), jobs))
    wall = time.perf_counter() - t0
    bad = [o.status for o in outs if o.status != "ok"]
    tokens = sum(o.tokens for o in outs)
    ttft = [o.ttft for o in outs if o.ttft is not None]
    gaps = [g for o in outs for g in o.gaps]
    return {
        "clients": clients,
        "requests": len(outs),
        "failed": len(bad),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_per_s": round(tokens / wall, 1),
        "ttft_ms": _pcts(ttft),
        "token_gap_ms": _pcts(gaps),
    }


def _pcts(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p99": None}
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else [xs[0]] * 99
    return {"p50": round(q[49] * 1e3, 2), "p99": round(q[98] * 1e3, 2)}


def soak(
    url: str, model: str, n: int, clients: int, max_tokens: int, cancel: float, pid: int | None, seed: int = 0
) -> dict:
    rng = random.Random(seed)
    plan = [
        (
            tag,
            rng.choice(PROMPTS),
            rng.randint(1, max_tokens),
            rng.randint(1, 8) if rng.random() < cancel else None,
        )
        for tag in range(n)
    ]
    before = _served(url)
    rss = RssWatch(pid)
    done: list[Outcome] = []
    lock = threading.Lock()

    def one(job):
        out = request(url, model, *job, client)
        with lock:
            done.append(out)
            rss.mark(len(done))
        return out

    with (
        httpx.Client(limits=httpx.Limits(max_connections=clients)) as client,
        ThreadPoolExecutor(clients) as pool,
    ):
        list(pool.map(one, plan))
    rss.stop()
    time.sleep(0.2)  # the server counts a cancelled request once its handler has ended
    after = _served(url)
    tags = sorted(o.tag for o in done)
    ids = [o.rid for o in done if o.status == "ok"]
    counted = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    checks = {
        "every request ended once": tags == list(range(n)),
        "no errors": all(o.status in ("ok", "cancelled") for o in done),
        "server ids unique": len(ids) == len(set(ids)),
        "server counted each once": sum(counted.values()) == n,
        "peak RSS last 100 within 10% of first 100": rss.within(0.10, 100, n),
    }
    return {
        "requests": n,
        "clients": clients,
        "finished": sum(o.status == "ok" for o in done),
        "cancelled": sum(o.status == "cancelled" for o in done),
        "errors": [o.status for o in done if o.status not in ("ok", "cancelled")][:5],
        "server_outcomes": counted,
        "rss_mb": rss.summary(100, n),
        "checks": checks,
    }


class RssWatch:
    """The server's RSS every 20 ms, tagged with how many soak requests had ended by then."""

    def __init__(self, pid: int | None):
        self.samples: list[tuple[int, float]] = []
        self._ended = 0
        self._stop = threading.Event()
        self._proc = psutil.Process(pid) if pid else None
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self._proc:
            self._thread.start()

    def mark(self, ended: int) -> None:
        self._ended = ended

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append((self._ended, self._proc.memory_info().rss / 2**20))

    def stop(self) -> None:
        self._stop.set()

    def summary(self, window: int, n: int) -> dict:
        first = [m for e, m in self.samples if e < window]
        last = [m for e, m in self.samples if e >= n - window]
        return {
            "peak_first": round(max(first), 1) if first else None,
            "peak_last": round(max(last), 1) if last else None,
        }

    def within(self, share: float, window: int, n: int) -> bool | None:
        s = self.summary(window, n)
        if s["peak_first"] is None or s["peak_last"] is None:
            return None  # no server process to watch (--url)
        return abs(s["peak_last"] - s["peak_first"]) <= share * s["peak_first"]


def _served(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    pattern = r'^gptdeploy_requests_total\{endpoint="completions",outcome="(\w+)"\} ([0-9.e+]+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.MULTILINE)}


def start_server(bundle: str, max_batch: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-c",
        "from gptdeploy.cli import main; main()",
        "serve",
        bundle,
        "--port",
        "0",
        "--max-batch",
        str(max_batch),
        "--max-queue",
        "1024",
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if found := re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line):
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, found.group(1)
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--url", help="A running server (default: start one on 127.0.0.1).")
    ap.add_argument("--model", help="Model name (default: the bundle directory's name).")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=8, help="Requests per client in the throughput phases.")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8, help="The started server's --max-batch.")
    ap.add_argument("--soak", type=int, default=500, help="Soak requests (0: no soak).")
    ap.add_argument("--soak-clients", type=int, default=16)
    ap.add_argument("--cancel", type=float, default=0.25, help="Share of soak requests cancelled early.")
    ap.add_argument("--server-arg", action="append", default=[], help="Passed on to `gptdeploy serve`.")
    ap.add_argument("--prompt-tokens", type=int, help="Prompts of N random token ids (seeded).")
    ap.add_argument("--vocab", type=int, help="--prompt-tokens ids below this (default: the bundle's vocabulary).")
    ap.add_argument("--ignore-eos", action="store_true", help="Send llama-server's ignore_eos (not gptdeploy's).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.prompt_tokens:
        manifest = json.loads(Path(args.bundle, "gptdeploy.json").read_text())
        vocab = args.vocab or manifest["tokenizer"]["vocab_size"]
        rng = random.Random(0)
        PROMPTS[:] = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(8)]
    if args.ignore_eos:
        EXTRA["ignore_eos"] = True
    model = args.model or args.bundle.rstrip("/").rsplit("/", 1)[-1]
    proc, url = (None, args.url) if args.url else start_server(args.bundle, args.max_batch, args.server_arg)
    try:
        phase(url, model, 1, 2, 8)  # warm-up
        report = {
            "alone": phase(url, model, 1, args.requests, args.max_tokens),
            "concurrent": phase(url, model, args.clients, args.requests, args.max_tokens),
        }
        report["speedup"] = round(report["concurrent"]["tok_per_s"] / report["alone"]["tok_per_s"], 2)
        if args.soak:
            report["soak"] = soak(
                url,
                model,
                args.soak,
                args.soak_clients,
                args.max_tokens,
                args.cancel,
                proc.pid if proc else None,
            )
    finally:
        if proc:
            proc.terminate()
            proc.wait(60)
    print(json.dumps(report, indent=2) if args.json else _table(report))
    if "soak" in report and not all(v is not False for v in report["soak"]["checks"].values()):
        sys.exit(1)


def _table(r: dict) -> str:
    lines = ["phase        clients  requests  tokens  tok/s    TTFT p50/p99 ms     token gap p50/p99 ms"]
    for name in ("alone", "concurrent"):
        p = r[name]
        lines.append(
            f"{name:<12} {p['clients']:>7} {p['requests']:>9} {p['tokens']:>7} {p['tok_per_s']:>7}  "
            f"{p['ttft_ms']['p50']}/{p['ttft_ms']['p99']:<14}  "
            f"{p['token_gap_ms']['p50']}/{p['token_gap_ms']['p99']}"
        )
    lines.append(f"aggregate speedup with {r['concurrent']['clients']} clients: {r['speedup']}x")
    if s := r.get("soak"):
        lines.append(
            f"soak: {s['requests']} requests, {s['clients']} clients: {s['finished']} finished, "
            f"{s['cancelled']} cancelled; server counted {s['server_outcomes']}; RSS MB {s['rss_mb']}"
        )
        lines += [
            f"  {'PASS' if ok else 'n/a' if ok is None else 'FAIL'}  {check}"
            for check, ok in s["checks"].items()
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
