"""`gptdeploy bench`: every bundle on every backend, and the baselines, on the same token ids.

Each row (bundle x backend, or baseline; x threads x batch x prompt length) runs in its own
subprocess (`python -m gptdeploy.bench.worker`; the llama.cpp row `llama_worker.py`), so that
thread pools never fight, one backend's memory never counts against another's, and the `ort` row
imports what an application would: numpy, onnxruntime, tokenizers, no torch. Decoding is greedy
within the tokenizer's vocabulary with a fixed number of new tokens (EOS does not stop it).
Warm-up runs are excluded; figures are the median over `runs`, with the spread (measure.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from gptdeploy import machine
from gptdeploy.bench import llama
from gptdeploy.bench.measure import Row, failed_row, latency_percentiles, stats
from gptdeploy.bundle import Bundle
from gptdeploy.errors import BackendUnavailable, GenerationError
from gptdeploy.machine import physical_cores
from gptdeploy.runtimes.backends import BACKENDS, missing, resolve_backend

__all__ = ["BASELINES", "BenchPlan", "Row", "Target", "add_ratios", "check_plan", "default_backends",
           "latency_percentiles", "machine_facts", "prompt_ids", "run_plan", "stats", "targets", "to_json"]

log = logging.getLogger(__name__)

BASELINES = ("hf", "optimum", "llama.cpp")
BENCH_SCHEMA = 2  # 2: several bundles, threads a list, llama.cpp rows; rows carry threads/bundle/precision


@dataclass(frozen=True)
class BenchPlan:
    bundles: tuple[Path, ...]
    backends: tuple[str, ...] = ()  # runtime names, "ort@int8" naming a graph; () = all available, per bundle
    batches: tuple[int, ...] = (1,)
    prompt_lens: tuple[int, ...] = (32,)
    new_tokens: int = 128
    runs: int = 3
    warmup: int = 1
    threads: tuple[int, ...] = field(default_factory=lambda: (physical_cores(),))
    baselines: tuple[str, ...] = ()
    source: Path | None = None
    seed: int = 0
    # Optimum pins transformers < 4.58, so it usually lives in a virtual environment of its
    # own: the optimum row runs under this interpreter (which needs gptdeploy installed too).
    optimum_python: str | None = None
    gguf: tuple[Path, ...] = ()  # one llama.cpp row per file
    # llama-cpp-python builds llama.cpp from source with the flags that suit the CPU; the row
    # runs under this interpreter, which needs numpy and llama_cpp only (not gptdeploy).
    llama_python: str | None = None


@dataclass(frozen=True)
class Target:
    """What one row runs: a backend ("ort@int8") on a bundle, or a baseline (hf, optimum, llama.cpp)."""

    kind: str  # "runtime" or a baseline name
    bundle: Path  # the bundle (a baseline's: the first one, for its vocabulary and size)
    backend: str | None = None
    gguf: Path | None = None


def prompt_ids(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """The same token ids for every backend: seeded, uniform over the tokenizer's vocabulary."""
    rng = np.random.default_rng(seed + 1000 * length + batch)
    return rng.integers(0, vocab, size=(batch, length)).tolist()


def check_plan(plan: BenchPlan) -> list[Bundle]:
    """Every bad option is an error before any work. Returns the bundles, loaded."""
    if not plan.bundles:
        raise GenerationError("name at least one bundle to benchmark")
    bundles = [Bundle.load(p) for p in plan.bundles]
    ctx = min(b.manifest.max_context for b in bundles)
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
    if not plan.threads or min(plan.threads) < 1:
        raise GenerationError(f"--threads must be at least 1, got {','.join(map(str, plan.threads)) or 'none'}")
    for spec in plan.backends:
        name, graph = split_backend(spec)
        resolve_backend(name)  # an unknown or unusable backend: BackendUnavailable naming the fix
        if graph is not None:
            for bundle in bundles:
                bundle.graph(graph)  # names the graphs the bundle has
    _check_baselines(plan)
    return bundles


def _check_baselines(plan: BenchPlan) -> None:
    for base in plan.baselines:
        if base not in BASELINES:
            raise BackendUnavailable(f"unknown baseline {base!r}; choose from {', '.join(BASELINES)}")
    if plan.gguf and "llama.cpp" not in plan.baselines:
        raise GenerationError("--gguf is for --baseline llama.cpp; add it")
    for base in dict.fromkeys(plan.baselines):
        if base == "llama.cpp":
            llama.check_llama(plan.gguf, plan.llama_python)
            continue
        if plan.source is None:
            raise GenerationError(f"--baseline {base} needs --source, the model the bundle was exported from")
        if not Path(plan.source).exists():
            raise GenerationError(f"--source {plan.source} does not exist")
        _check_baseline_available(base, plan.optimum_python if base == "optimum" else None)


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


def targets(plan: BenchPlan, bundles: list[Bundle]) -> list[Target]:
    """The rows of one configuration, in order: baselines as given (llama.cpp once per GGUF), then
    each bundle's backends (`plan.backends`, else every one available for that bundle)."""
    out: list[Target] = []
    for base in dict.fromkeys(plan.baselines):
        if base == "llama.cpp":
            out += [Target(base, plan.bundles[0], gguf=Path(g)) for g in plan.gguf]
        else:
            out.append(Target(base, plan.bundles[0]))
    for path, bundle in zip(plan.bundles, bundles):
        out += [Target("runtime", path, backend=s) for s in plan.backends or default_backends(bundle)]
    return out


def run_plan(plan: BenchPlan, on_row: Callable[[Row], None] | None = None,
             bundles: list[Bundle] | None = None) -> list[Row]:
    """Measure every configuration; rows come back in order. KeyboardInterrupt propagates
    after `on_row` has seen every finished row (the CLI prints what was measured).
    `bundles`: check_plan's result when the caller has it (its checks start subprocesses)."""
    bundles = check_plan(plan) if bundles is None else bundles
    loaded = dict(zip(plan.bundles, bundles))
    vocab = min(b.manifest.tokenizer.vocab_size for b in bundles)  # ids every bundle's tokenizer knows
    plan_targets = targets(plan, bundles)
    rows: list[Row] = []
    for threads in plan.threads:
        for batch in plan.batches:
            for plen in plan.prompt_lens:
                ids = prompt_ids(vocab, batch, plen, plan.seed)
                for target in plan_targets:
                    row = _run_target(plan, target, loaded[target.bundle], ids, threads)
                    rows.append(row)
                    if on_row:
                        on_row(row)
    add_ratios(rows)
    return rows


def _run_target(plan: BenchPlan, t: Target, bundle: Bundle, ids: list[list[int]], threads: int) -> Row:
    job = {
        "bundle": str(t.bundle), "baseline": None if t.kind == "runtime" else t.kind, "backend": t.backend,
        "gguf": str(t.gguf) if t.gguf else None, "source": str(plan.source) if plan.source else None,
        "prompt_ids": ids, "new_tokens": plan.new_tokens, "runs": plan.runs, "warmup": plan.warmup,
        "threads": threads, "vocab": bundle.manifest.tokenizer.vocab_size,
    }
    if t.kind == "llama.cpp":
        argv = llama.worker_command(plan.llama_python)
    else:
        python = plan.optimum_python if t.kind == "optimum" else None
        argv = [python or sys.executable, "-m", "gptdeploy.bench.worker"]
    row = _run_worker(job, argv, label=t.backend or (f"llama.cpp ({t.gguf.name})" if t.gguf else t.kind))
    row.threads = threads
    row.bundle = row.bundle or str(t.gguf or t.bundle)
    if not row.model_mb and t.kind != "llama.cpp":  # a llama.cpp row sizes its own GGUF and KV cache
        graph = split_backend(t.backend)[1] if t.backend else None
        row.model_mb = model_bytes(bundle, graph, len(ids), len(ids[0]) + plan.new_tokens) / 2**20
    return row


def model_bytes(bundle: Bundle, graph: str | None, batch: int, total_len: int) -> int:
    """What any runtime must hold for one configuration: the graph's weights (its files, as
    shipped) and a KV cache of `total_len` positions; peak RSS is reported against it."""
    entry = bundle.graph(graph)
    weights = sum(bundle.file(f).stat().st_size for f in filter(None, (entry.file, entry.data_file)))
    sig = entry.signature
    kv = batch * total_len * sig.n_layer * 2 * sig.kv_heads * sig.head_dim * np.dtype(sig.kv_dtype).itemsize
    return weights + kv


def _run_worker(job: dict, argv: list[str], label: str) -> Row:
    """One row in its own process. A worker that dies without a result (a crash in native code,
    such as the SIGILL of a miscompiled kernel) becomes that row's error; the run goes on."""
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]))
    proc = subprocess.run(argv, input=json.dumps(job), capture_output=True, text=True, env=env, check=False)
    if proc.returncode == 130 or proc.returncode == -2:
        raise KeyboardInterrupt
    try:
        return Row(**json.loads(proc.stdout.strip().splitlines()[-1]))
    except (IndexError, json.JSONDecodeError, TypeError):
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])
        how = f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return failed_row(job, label, f"worker died ({how}): {tail}", kind=job["baseline"] or label.partition("@")[0])


def add_ratios(rows: list[Row]) -> None:
    """Each row's decode tokens/s and TTFT as a ratio to the first baseline row of its configuration
    (threads, batch, prompt; a baseline row if one was measured, else the first row), and to the
    llama.cpp row of the same precision (fp32 ~ f32, int8 ~ q8_0, int4 ~ q4_0) when there is one."""
    groups: dict[tuple[int, int, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.threads, r.batch, r.prompt_len), []).append(r)
    for group in groups.values():
        ok = [r for r in group if not r.error and r.decode_tps]
        base = next((r for r in group if r.kind in BASELINES and not r.error), None) or group[0]
        for r in ok:
            if base in ok:
                r.ratio = _ratio(r, base)
            peer = next((p for p in ok if p.kind == "llama.cpp" and p is not r
                         and llama.precision_class(p.precision) == llama.precision_class(r.precision)), None)
            if peer is not None and r.kind != "llama.cpp":
                r.same_precision = _ratio(r, peer)


def _ratio(r: Row, base: Row) -> dict:
    return {"vs": base.label, "decode_tps": r.decode_tps["median"] / base.decode_tps["median"],
            "ttft": r.ttft_s["median"] / base.ttft_s["median"]}


VERSIONED = ("gptdeploy", "numpy", "onnxruntime", "tokenizers", "torch", "transformers", "optimum", "tensorrt",
             "llama_cpp_python")


def machine_facts(threads: tuple[int, ...]) -> dict:
    """CPU, kernel-deciding flags (AVX2, AVX-512, VNNI, BF16, AMX), cores, versions."""
    return machine.facts(threads[0] if len(threads) == 1 else list(threads), VERSIONED)


def to_json(plan: BenchPlan, rows: list[Row], complete: bool = True) -> dict:
    def plain(v):
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, tuple) else v

    return {
        "schema": BENCH_SCHEMA,
        "complete": complete,
        "plan": {k: plain(v) for k, v in asdict(plan).items()},
        "machine": machine_facts(plan.threads),
        "rows": [asdict(r) for r in rows],
    }
