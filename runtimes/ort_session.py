"""How the `ort` runtime opens an onnxruntime CPU session: its options, and the attention kernel
onnxruntime's GroupQueryAttention runs.

onnxruntime's CPU GroupQueryAttention has two kernels: a tiled "flash" one (its default in
onnxruntime 1.32, which this was measured with) and one that materializes each head's
(T_new x T) scores. The kernel reads `ORT_GQA_DISABLE_FLASH_ATTENTION`
once, when a session creates it; there is no session option for it. On the machine
docs/performance.md measured (2-core Xeon, head size 64), the tiled kernel took 1.06-1.25x as long
to prefill 512 or 900 positions and decoded at 0.90-1.02x the rate after them (fp32, int8, int4
and an int8 cache; GPT-2-124M and SmolLM-135M shapes; `samples/bench_variants.py`). On a 6-layer
model of SmolLM's heads with 8192 positions it prefilled 1000-8000 positions in 0.94-0.99x the
time but decoded at 0.87-1.00x the rate after them. So gptdeploy's sessions use the
materializing one, as long as its probabilities buffer stays small: it holds heads x C x T
floats per batch row for a call of C positions over a cache of T, which is 9 x 256 x 2048 x 4 B
= 18 MiB for SmolLM-135M's whole context in the runtime's chunks of 256, but 448 MiB for a
32K-context model of 14 heads. Where the model's whole context would take more than
PROBS_BUDGET per row, onnxruntime's tiled kernel (which holds a few tiles) stays. Setting
the variable yourself overrides both (`0`: tiled, `1`: materializing). Audit graphs
(`qk_output`) always run the materializing kernel, whichever is set.

The variable is process-wide: while a session is being created it holds gptdeploy's choice for
every thread of the process (a lock orders gptdeploy's own sessions), then it is put back.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from gptdeploy.errors import ConfigError

PROVIDERS = ["CPUExecutionProvider"]  # explicit: never let onnxruntime pick (or warn about) providers
ORT_ERRORS = (  # what onnxruntime raises for a graph or a run it refuses
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.RuntimeException,
    ort_state.InvalidProtobuf,
    ort_state.InvalidGraph,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
)
PROBS_BUDGET = 128 << 20  # bytes of attention probabilities per batch row the materializing kernel may hold
GQA_FLASH_ENV = "ORT_GQA_DISABLE_FLASH_ATTENTION"  # onnxruntime's own switch, read at session creation
BOOL_VALUES = ("0", "1", "false", "true", "False", "True")  # what onnxruntime parses as a bool
_env_lock = threading.Lock()  # one session at a time sets and restores the variable


def session_options(threads: int) -> ort.SessionOptions:
    """The options both the `ort` runtime and the benchmark's bare loops use."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1  # one sequential chain of ops: a second pool only adds wake-ups
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Memory patterns pre-plan one block per input-shape set; every decode step has new shapes,
    # and at prefill 512 the planned block held 49 MiB more than allocating per tensor, for the
    # same speed (GPT-2-124M: 819 -> 770 MiB peak, 581 vs 579 ms, measured).
    so.enable_mem_pattern = False
    so.log_severity_level = 3  # errors only; optimizer notes are not the user's business
    return so


def needs_tiled_attention(n_head: int, context: int, rows: int | None) -> bool:
    """Whether a model of `n_head` query heads and `context` positions, prefilled `rows` positions
    a call (None: a whole context at once), needs GroupQueryAttention's tiled kernel to keep its
    probabilities under PROBS_BUDGET per batch row (the other kernel is faster: module docstring)."""
    rows = min(rows or context, context)
    return n_head * rows * context * 4 > PROBS_BUDGET  # (nh, C, T) float32


def open_session(path: Path, options: ort.SessionOptions, gqa_flash: bool | None = None,
                 flash_default: bool = False) -> ort.InferenceSession:
    """A CPU session over the graph at `path`. `gqa_flash`: run GroupQueryAttention's tiled kernel
    (True) or the materializing one (False); None: as `ORT_GQA_DISABLE_FLASH_ATTENTION` says where
    the user set it, else `flash_default` (needs_tiled_attention). The user's setting is read under
    the same lock that sets and restores the variable, so another session's temporary value is
    never taken for it. Raises ConfigError for a setting onnxruntime cannot read, and what
    onnxruntime raises (ORT_ERRORS)."""
    with _env_lock:
        before = os.environ.get(GQA_FLASH_ENV)
        user = before or None  # an empty value is unset, as onnxruntime reads it
        if user is not None and user not in BOOL_VALUES:
            raise ConfigError(f"{GQA_FLASH_ENV}={user!r}: onnxruntime reads 1 (its materializing attention "
                              "kernel) or 0 (its tiled one); unset it to let gptdeploy choose")
        try:
            if gqa_flash is not None or user is None:
                flash = flash_default if gqa_flash is None else gqa_flash
                os.environ[GQA_FLASH_ENV] = "0" if flash else "1"
            return ort.InferenceSession(str(path), options, providers=PROVIDERS)
        finally:
            if before is None:
                os.environ.pop(GQA_FLASH_ENV, None)
            else:
                os.environ[GQA_FLASH_ENV] = before
