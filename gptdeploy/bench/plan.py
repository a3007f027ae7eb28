"""`gptdeploy bench`: every backend on the same token ids, the same threads, in one run.

Each row (backend x batch x prompt length) runs in its own subprocess
(`python -m gptdeploy.bench.worker`), so that thread pools never fight, one backend's
memory never counts against another's, and the `ort` row imports what an application
would: numpy, onnxruntime, tokenizers, no torch. Decoding is greedy with a fixed number of
new tokens (EOS does not stop it). Warm-up runs are excluded; figures are the median over
`runs`, with the spread.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from gptdeploy import machine
from gptdeploy.bundle import Bundle
from gptdeploy.errors import BackendUnavailable, GenerationError, GptDeployError
from gptdeploy.machine import physical_cores
from gptdeploy.runtimes.backends import BACKENDS, missing, resolve_backend

log = logging.getLogger(__name__)

BASELINES = ("hf", "optimum")
BENCH_SCHEMA = 1


@dataclass(frozen=True)
class BenchPlan:
    bundle: Path
    backends: tuple[str, ...]  # runtime names, "ort@int8" style when naming a graph
    batches: tuple[int, ...] = (1,)
    prompt_lens: tuple[int, ...] = (32,)
    new_tokens: int = 128
    runs: int = 3
    warmup: int = 1
    threads: int = field(default_factory=physical_cores)
    baselines: tuple[str, ...] = ()
    source: Path | None = None
    seed: int = 0
    # Optimum pins transformers < 4.58, so it usually lives in a virtual environment of its
    # own: the optimum row runs under this interpreter (which needs gptdeploy installed too).
    optimum_python: str | None = None


@dataclass
class Row:
    """One measured configuration. Times in seconds; rates in tokens/s (all rows of the batch)."""

    label: str  # "ort fp32", "torch", "hf (transformers generate)"
    kind: str  # backend or baseline name
    graph: str | None
    batch: int
    prompt_len: int
    new_tokens: int
    load_s: float = 0.0
    ttft_s: dict = field(default_factory=dict)  # stats over runs
    decode_tps: dict = field(default_factory=dict)
    e2e_tps: dict = field(default_factory=dict)
    token_latency_ms: dict = field(default_factory=dict)  # p50/p90/p99 over every decode step
    peak_rss_mb: float = 0.0
    model_mb: float = 0.0  # the bundle graph's weights + this configuration's KV cache (B x (T + n))
    peak_gpu_mb: float | None = None
    tokens: list[list[int]] = field(default_factory=list)  # generated ids of the last run
    ratio: dict = field(default_factory=dict)  # decode_tps / ttft vs the first baseline row
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


def prompt_ids(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """The same token ids for every backend: seeded, uniform over the tokenizer's vocabulary."""
    rng = np.random.default_rng(seed + 1000 * length + batch)
    return rng.integers(0, vocab, size=(batch, length)).tolist()


def check_plan(plan: BenchPlan) -> Bundle:
    """Every bad option is an error before any work."""
    bundle = Bundle.load(plan.bundle)
    ctx = bundle.manifest.max_context
    for b in plan.batches:
        if b < 1:
            raise GenerationError(f"batch must be at least 1, got {b}")
    for p in plan.prompt_lens:
        if p < 1:
            raise GenerationError(f"prompt length must be at least 1, got {p}")
        if p + plan.new_tokens > ctx:
            raise GenerationError(
                f"prompt {p} + {plan.new_tokens} new tokens needs {p + plan.new_tokens} positions; "
                f"the model has {ctx}. Lower --prompt-len or --new-tokens."
            )
    if plan.new_tokens < 2:
        raise GenerationError(f"--new-tokens must be at least 2 (one prefill token, one decode), got {plan.new_tokens}")
    if plan.runs < 1:
        raise GenerationError(f"--runs must be at least 1, got {plan.runs}")
    if plan.threads < 1:
        raise GenerationError(f"--threads must be at least 1, got {plan.threads}")
    for spec in plan.backends:
        name, graph = split_backend(spec)
        resolve_backend(name)  # an unknown or unusable backend: BackendUnavailable naming the fix
        if graph is not None:
            bundle.graph(graph)  # names the graphs the bundle has
    for base in plan.baselines:
        if base not in BASELINES:
            raise BackendUnavailable(f"unknown baseline {base!r}; choose from {', '.join(BASELINES)}")
        if plan.source is None:
            raise GenerationError(f"--baseline {base} needs --source, the model the bundle was exported from")
        if not Path(plan.source).exists():
            raise GenerationError(f"--source {plan.source} does not exist")
        _check_baseline_available(base, plan.optimum_python if base == "optimum" else None)
    return bundle


def _check_baseline_available(base: str, python: str | None) -> None:
    modules = {"hf": "torch, transformers", "optimum": "torch, transformers, optimum.onnxruntime, gptdeploy"}[base]
    probe = subprocess.run([python or sys.executable, "-c", f"import {modules}"], capture_output=True, text=True,
                           check=False) if python or base == "optimum" else None
    if probe is None:
        for module in ("torch", "transformers"):
            try:
                metadata.version(module)
            except metadata.PackageNotFoundError:
                raise BackendUnavailable(
                    f"baseline {base!r} needs {module}, which is not installed; pip install 'gptdeploy[export]'"
                ) from None
    elif probe.returncode != 0:
        where = python or sys.executable
        raise BackendUnavailable(
            f"baseline {base!r} cannot run under {where}: {(probe.stderr.strip().splitlines() or ['?'])[-1]}; "
            "make a virtual environment with `pip install torch==2.13.0 optimum[onnxruntime]` and gptdeploy "
            "(--no-deps), and pass its python with --optimum-python"
        )


def split_backend(spec: str) -> tuple[str, str | None]:
    name, _, graph = spec.partition("@")
    return name, graph or None


def default_backends(bundle: Bundle) -> tuple[str, ...]:
    """Every runtime usable here, `ort` once per graph in the bundle."""
    out = []
    for name in BACKENDS:
        if missing(name) is not None:
            continue
        if name.startswith("ort"):
            out += [f"{name}@{g}" for g in bundle.manifest.graphs]
        else:
            out.append(name)
    return tuple(out)


def run_plan(plan: BenchPlan, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Measure every configuration; rows come back in order. KeyboardInterrupt propagates
    after `on_row` has seen every finished row (the CLI prints what was measured)."""
    bundle = check_plan(plan)
    vocab = bundle.manifest.tokenizer.vocab_size
    rows: list[Row] = []
    specs = [(b, None) for b in plan.baselines] + [(None, s) for s in plan.backends]
    for batch in plan.batches:
        for plen in plan.prompt_lens:
            ids = prompt_ids(vocab, batch, plen, plan.seed)
            model_mb = model_bytes(bundle, batch, plen + plan.new_tokens) / 2**20
            for baseline, spec in specs:
                job = {
                    "bundle": str(plan.bundle), "baseline": baseline, "backend": spec,
                    "source": str(plan.source) if plan.source else None, "prompt_ids": ids,
                    "new_tokens": plan.new_tokens, "runs": plan.runs, "warmup": plan.warmup,
                    "threads": plan.threads, "vocab": vocab,
                }
                python = plan.optimum_python if baseline == "optimum" else None
                row = _run_worker(job, python or sys.executable)
                row.model_mb = model_mb
                rows.append(row)
                if on_row:
                    on_row(row)
    add_ratios(rows)
    return rows


def model_bytes(bundle: Bundle, batch: int, total_len: int) -> int:
    """What any runtime must hold for one configuration: the graph's weights (its files, as
    shipped) and a KV cache of `total_len` positions; peak RSS is reported against it."""
    entry = bundle.graph()
    weights = sum(bundle.file(f).stat().st_size for f in filter(None, (entry.file, entry.data_file)))
    sig = entry.signature
    kv = batch * total_len * sig.n_layer * 2 * sig.kv_heads * sig.head_dim * np.dtype(sig.kv_dtype).itemsize
    return weights + kv


def _run_worker(job: dict, python: str) -> Row:
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]))
    proc = subprocess.run(
        [python, "-m", "gptdeploy.bench.worker"], input=json.dumps(job), capture_output=True,
        text=True, env=env, check=False,
    )
    if proc.returncode == 130 or proc.returncode == -2:
        raise KeyboardInterrupt
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])
        raise GptDeployError(f"benchmark worker for {job['backend'] or job['baseline']} failed: {tail}") from None
    return Row(**data)


def add_ratios(rows: list[Row]) -> None:
    """Each row's decode tokens/s and TTFT as a ratio to the first baseline row of its configuration
    (a baseline row if one was measured, else the first row)."""
    groups: dict[tuple[int, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.batch, r.prompt_len), []).append(r)
    for group in groups.values():
        base = next((r for r in group if r.kind in BASELINES and not r.error), None) or group[0]
        for r in group:
            if r.error or base.error or not r.decode_tps or not base.decode_tps:
                continue
            r.ratio = {
                "vs": base.label,
                "decode_tps": r.decode_tps["median"] / base.decode_tps["median"],
                "ttft": r.ttft_s["median"] / base.ttft_s["median"],
            }


VERSIONED = ("gptdeploy", "numpy", "onnxruntime", "tokenizers", "torch", "transformers", "optimum", "tensorrt",
             "llama_cpp_python")


def machine_facts(threads: int) -> dict:
    return machine.facts(threads, VERSIONED)


def to_json(plan: BenchPlan, rows: list[Row], complete: bool = True) -> dict:
    return {
        "schema": BENCH_SCHEMA,
        "complete": complete,
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
        "machine": machine_facts(plan.threads),
        "rows": [asdict(r) for r in rows],
    }
