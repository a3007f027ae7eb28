"""One benchmark row, in its own process: `python -m gptdeploy.bench.worker < job.json`.

Prints one JSON line (a bench.Row). Imports only what its backend needs, so the `ort` row
measures what an application embedding gptdeploy would load.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import asdict
from itertools import pairwise

import numpy as np

from gptdeploy.bench.measure import Row, failed_row, measure


class _DeviceMemory:
    """Peak GPU memory of a backend that does not count its own (ort-cuda, tensorrt): device memory
    in use (cudaMemGetInfo) after every run, less what was in use before the runtime was opened.
    Sampled between runs, so it is what the backend holds (onnxruntime's arena keeps its peak;
    TensorRT's buffers are allocated once), not a transient inside a step. None without cuda-python."""

    def __init__(self):
        try:
            from gptdeploy.runtimes import cuda

            self._cudart = cuda.load_cudart()
            self._used = lambda: cuda.memory_in_use(self._cudart)
            self.baseline = self._used()
        except Exception:  # noqa: BLE001 - no cuda-python or no GPU: the row just has no GPU figure
            self._used, self.baseline = None, 0
        self.peak = 0

    def sample(self) -> None:
        if self._used is not None:
            self.peak = max(self.peak, self._used())

    def mb(self) -> float | None:
        return None if self._used is None else max(0, self.peak - self.baseline) / 2**20


def run_runtime(job: dict) -> Row:
    from gptdeploy.bundle import Bundle
    from gptdeploy.runtimes.backends import open_runtime
    from gptdeploy.steps import Steps

    name, _, graph = job["backend"].partition("@")
    bundle = Bundle.load(job["bundle"])
    entry = bundle.graph(graph or None)
    ids = job["prompt_ids"]  # (B, T), every row of one length: no padding
    B, T = len(ids), len(ids[0])
    n = job["new_tokens"]
    vocab = bundle.manifest.tokenizer.vocab_size
    row = Row(f"{name} {entry.name} ({job['bundle']})", name, entry.name, B, T, n, job["threads"],
              bundle=job["bundle"], precision=entry.precision)
    device = _DeviceMemory() if name in ("ort-cuda", "tensorrt") else None
    t0 = time.perf_counter()
    runtime = open_runtime(bundle, name, entry.name, job["threads"])
    row.load_s = time.perf_counter() - t0

    def one_run() -> tuple[float, list[float], list[list[int]]]:
        start = time.perf_counter()
        steps = Steps(runtime, ids, pad_id=0, room=n)
        nxt = steps.prefill().logits[:, :vocab].argmax(-1)  # (B,) greedy
        ttft = time.perf_counter() - start
        tokens, times = [nxt], []
        for _ in range(1, n):
            s = time.perf_counter()
            nxt = steps.decode(nxt).logits[:, :vocab].argmax(-1)
            times.append(time.perf_counter() - s)
            tokens.append(nxt)
        return ttft, times, np.stack(tokens, 1).tolist()

    with runtime:
        measure(row, one_run, job, after_run=device.sample if device else lambda: None)
        row.peak_gpu_mb = device.mb() if device else getattr(runtime, "peak_device_mb", None)
    return row


class _StepClock:
    """A transformers streamer that timestamps every token generate() emits."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[np.ndarray] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt itself
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.append(value.reshape(-1).numpy().copy())

    def end(self) -> None:
        pass


def run_baseline(job: dict) -> Row:
    import torch

    torch.set_num_threads(job["threads"])
    ids = torch.tensor(job["prompt_ids"], dtype=torch.int64)
    B, T = ids.shape
    n = job["new_tokens"]
    t0 = time.perf_counter()
    if job["baseline"] == "hf":
        import transformers
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(job["source"], dtype=torch.float32).eval()
        row = Row(f"hf (transformers {transformers.__version__} generate)", "hf", None, B, T, n, job["threads"])
    else:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = job["threads"], 1
        model = ORTModelForCausalLM.from_pretrained(job["source"], export=True, session_options=so)
        from importlib.metadata import version

        row = Row(f"optimum {version('optimum')} (ORTModelForCausalLM)", "optimum", None, B, T, n, job["threads"])
    row.load_s = time.perf_counter() - t0
    row.bundle, row.precision = job["source"], "fp32"  # the source framework's own fp32 forward
    mask = torch.ones_like(ids)
    # Equal conditions: the runtimes never pick ids past the tokenizer's vocabulary (padding
    # rows, e.g. nanoGPT's 50304, or a model larger than its tokenizer); neither may generate().
    rows = model.config.vocab_size
    suppress = {"suppress_tokens": list(range(job["vocab"], rows))} if job["vocab"] < rows else {}

    def one_run():
        clock = _StepClock()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, streamer=clock, pad_token_id=0, **suppress)
        times = [start, *clock.times]
        steps = [b - a for a, b in pairwise(times[1:])]  # between emitted tokens
        return times[1] - start, steps, np.stack(clock.tokens, 1).tolist()

    return measure(row, one_run, job)


def main() -> None:
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    job = json.loads(sys.stdin.read())
    try:
        row = run_baseline(job) if job.get("baseline") else run_runtime(job)
    except Exception as exc:  # noqa: BLE001 - reported as the row's error, the run goes on
        row = failed_row(job, str(job.get("backend") or job.get("baseline")), str(exc))
    print(json.dumps(asdict(row)))


if __name__ == "__main__":
    main()
