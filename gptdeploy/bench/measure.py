"""What every benchmark row is and how it is measured: the Row, its statistics, and `measure`.

Standard library and numpy only, on purpose: the llama.cpp row runs this file under another
interpreter (the one with llama-cpp-python), where gptdeploy need not be installed, so that
row is timed by the very same code as every other row.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Row:
    """One measured configuration. Times in seconds; rates in tokens/s (all rows of the batch)."""

    label: str  # "ort int8 (int8)", "torch fp32 (bundle)", "llama.cpp q4_0 (m124-q4_0.gguf)"
    kind: str  # backend or baseline name
    graph: str | None
    batch: int
    prompt_len: int
    new_tokens: int
    threads: int = 0
    bundle: str | None = None  # the bundle directory, or the GGUF file of a llama.cpp row
    precision: str | None = None  # the graph's precision ("fp32", "int8"), or the GGUF's type ("q4_0")
    load_s: float = 0.0
    ttft_s: dict = field(default_factory=dict)  # stats over runs
    decode_tps: dict = field(default_factory=dict)
    e2e_tps: dict = field(default_factory=dict)
    token_latency_ms: dict = field(default_factory=dict)  # p50/p90/p99 over every decode step
    peak_rss_mb: float = 0.0
    model_mb: float = 0.0  # the graph's (or GGUF's) weights + this configuration's KV cache (B x (T + n))
    peak_gpu_mb: float | None = None
    info: str | None = None  # what the backend says of itself (llama.cpp: version, kernels compiled in)
    tokens: list[list[int]] = field(default_factory=list)  # generated ids of the last run
    ratio: dict = field(default_factory=dict)  # decode_tps / ttft vs the first baseline row
    same_precision: dict = field(default_factory=dict)  # ... vs the llama.cpp row of the same precision
    error: str | None = None


def stats(values: list[float]) -> dict:
    """Median and spread of one figure over runs."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {}
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "stdev": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def latency_percentiles(step_seconds: list[float]) -> dict:
    a = np.asarray(step_seconds, dtype=np.float64) * 1e3
    if a.size == 0:
        return {}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    from the parent across fork + exec, so every worker would report at least the CLI's size."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: best effort


def measure(row: Row, one_run, job: dict, after_run=lambda: None) -> Row:
    """Warm up, time `runs` runs, and fill `row`. `one_run() -> (ttft_s, decode step seconds, tokens)`."""
    for _ in range(job["warmup"]):
        one_run()
        after_run()
    runs = []
    for _ in range(job["runs"]):
        runs.append(one_run())
        after_run()
    ttfts = [t for t, _, _ in runs]
    decode = [row.batch * len(steps) / sum(steps) for _, steps, _ in runs]
    e2e = [row.batch * (len(steps) + 1) / (t + sum(steps)) for t, steps, _ in runs]
    row.ttft_s, row.decode_tps, row.e2e_tps = stats(ttfts), stats(decode), stats(e2e)
    row.token_latency_ms = latency_percentiles([s for _, steps, _ in runs for s in steps])
    row.tokens = runs[-1][2]
    row.peak_rss_mb = peak_rss_mb()
    return row


def failed_row(job: dict, label: str, why: str, kind: str | None = None) -> Row:
    """The row of a configuration that could not run (a worker's error, or a worker that died):
    the run goes on."""
    ids = job["prompt_ids"]
    return Row(label, kind or label, None, len(ids), len(ids[0]), job["new_tokens"], job["threads"],
               error=" ".join(why.split())[:300])
