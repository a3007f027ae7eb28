"""llama.cpp as a baseline: checks before a run, the worker's command line, llama.cpp's own tools.

The row itself is measured by `llama_worker.py` under the interpreter that has llama-cpp-python
(`--llama-python`). `llama_bench_decode` and `batched_bench_decode` run llama.cpp's own
`llama-bench` / `llama-batched-bench` on the same GGUF, so that a test (tests/test_bench_llama.py)
can show the row does not handicap llama.cpp. docs/performance.md says how to build all of it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from gptdeploy.errors import BackendUnavailable, GenerationError, GptDeployError

WORKER = Path(__file__).with_name("llama_worker.py")  # run by path: needs numpy + llama_cpp only

# A GGUF's weight type -> the gptdeploy precision it is compared with ("same precision" ratios).
# Q8_0 and int8 both keep 8-bit weights (Q8_0 a scale per block of 32, int8 one per tensor);
# Q4_0 and int4 both keep 4-bit weights with a scale per block (Q4_0 of 32, int4 MatMulNBits of 128).
PRECISION_CLASS = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "q8_0": "int8", "q4_0": "int4"}


def precision_class(precision: str | None) -> str | None:
    """The gptdeploy precision a row's precision compares with (a GGUF type is mapped; others kept)."""
    if precision is None:
        return None
    if precision in PRECISION_CLASS:
        return PRECISION_CLASS[precision]
    return "int4" if precision.startswith("q4") else "int8" if precision.startswith("q8") else precision


def check_llama(gguf: tuple[Path, ...], python: str | None) -> None:
    """Every GGUF exists, and the interpreter that runs the row imports numpy and llama_cpp."""
    if not gguf:
        raise GenerationError("--baseline llama.cpp needs --gguf FILE (one llama.cpp row per file)")
    for f in gguf:
        if not Path(f).is_file():
            raise GenerationError(f"--gguf {f} does not exist")
    where = python or sys.executable
    try:
        probe = subprocess.run([where, "-c", "import numpy, llama_cpp"], capture_output=True, text=True,
                               check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendUnavailable(f"--llama-python {where} cannot run: {exc}") from None
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise BackendUnavailable(
            f"baseline 'llama.cpp' cannot run under {where}: {last}; install llama-cpp-python there "
            "(it builds llama.cpp from source: see docs/performance.md) and pass it with --llama-python"
        )


def worker_command(python: str | None) -> list[str]:
    return [python or sys.executable, str(WORKER)]


def _run_tool(cmd: list[str], threads: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # as the bench workers run
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        raise BackendUnavailable(f"cannot run {cmd[0]}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])
        raise GptDeployError(f"{Path(cmd[0]).name} failed (exit {done.returncode}): {tail}")
    return done.stdout


def llama_bench_decode(binary: str, gguf: Path, threads: int, depth: int, n_gen: int, reps: int) -> dict:
    """llama-bench's decode figure: `n_gen` tokens after `depth` positions already in the cache
    (`-d`, what a row's decode steps see after its prompt), `reps` timed repetitions after its
    own warm-up. Returns {"avg_ts", "stddev_ts", "samples_ts", "model_type"}."""
    out = _run_tool([binary, "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(n_gen), "-d", str(depth),
                     "-r", str(reps), "-o", "json"], threads)
    try:
        (rec,) = json.loads(out)
    except (ValueError, TypeError) as exc:
        raise GptDeployError(f"cannot read llama-bench's JSON: {exc}") from None
    return {k: rec[k] for k in ("avg_ts", "stddev_ts", "samples_ts", "model_type")}


_BATCHED_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|" + r"\s*([\d.]+)\s*\|" * 7)


def batched_bench_decode(binary: str, gguf: Path, threads: int, prompt_len: int, n_gen: int,
                         batches: tuple[int, ...]) -> dict[int, float]:
    """llama-batched-bench's aggregate decode tokens/s (S_TG) per batch size: B sequences of
    `prompt_len` prompt tokens, each generating `n_gen`."""
    ctx = max(batches) * (prompt_len + n_gen)
    out = _run_tool([binary, "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(ctx),
                     "-b", str(max(512, ctx)), "-ub", str(max(512, ctx)), "-npp", str(prompt_len),
                     "-ntg", str(n_gen), "-npl", ",".join(map(str, batches))], threads)
    found = {}
    for line in out.splitlines():  # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
        if m := _BATCHED_ROW.match(line.strip()):
            found[int(m.group(3))] = float(m.group(8))
    if not found:
        raise GptDeployError("llama-batched-bench printed no result table")
    return found
