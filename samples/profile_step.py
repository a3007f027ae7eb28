"""Where the milliseconds of one decode step go: onnxruntime's profiler, per-op totals, per graph.

    python samples/profile_step.py BUNDLE [BUNDLE ...] [--context 32,512] [--steps 48] [--threads 2]
    python samples/profile_step.py --bandwidth        # this machine's memory bandwidth (numpy)

Each bundle runs through the `ort` runtime (the Generator's path, IOBinding, its own KV cache
mode) with onnxruntime's profiler on: a prefill of `context` random ids, `--warmup` decode steps,
then `--steps` profiled decode steps. The table splits one step's wall time into

  weights      kernels that read a weight matrix (MatMul/Gemm on an initializer, MatMulNBits,
               DynamicQuantizeMatMul), with the bytes they read and the GB/s that implies
  quantize     activation quantization kernels that run on their own (DynamicQuantizeLinear ...)
  attention    MultiHeadAttention / GroupQueryAttention, or the unfused graph's Softmax and
               activation-by-activation MatMuls
  kv copy      Concat nodes that write a present.* tensor (past + new, copied every step)
  norms + act  LayerNorm, Skip*Norm, GELU kinds
  small ops    everything else (Reshape, Split, Where, Cast, Gather, Add ...)
  executor     the run's time outside any kernel (allocation, scheduling)
  python       the step's wall time outside the run: binding, numpy, the runtime's bookkeeping

The prefill row of each context is one profiled run (the TTFT's graph part). The machine these
notes come from is shared: compare graphs within one run of this script, not across runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

WEIGHT_OPS = {"MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "Gemm", "QGemm"}
MATMULS = {"MatMul", "FusedMatMul"}
ATTENTION_OPS = {"MultiHeadAttention", "GroupQueryAttention", "Attention", "Softmax"}
QUANT_OPS = {"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMulInteger"}
NORM_OPS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization", "FastGelu", "BiasGelu", "Gelu", "QuickGelu"}
WEIGHT_MIN_BYTES = 1 << 16  # a MatMul reading this many bytes of initializers reads a weight matrix
CATEGORIES = ("weights", "quantize", "attention", "kv copy", "norms + act", "small ops", "executor", "python")


def _shapes(event: dict, key: str) -> list[tuple[str, list[int]]]:  # the profiler's input/output shapes
    return [next(iter(d.items())) for d in event["args"].get(key, [])]


def weight_bytes(graph: Path) -> dict[str, int]:
    """Node name -> bytes of the initializers it reads (the profiler leaves pre-packed weights out
    of its input shapes, so they are counted from the graph file)."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(graph), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
             for t in proto.graph.initializer}
    return {n.name: sum(sizes.get(i, 0) for i in n.input) for n in proto.graph.node}


def categorize(event: dict, weights: dict[str, int]) -> tuple[str, int]:
    """(category, bytes of weights read) of one kernel event, from its op type and input shapes."""
    op = event["args"]["op_name"]
    nbytes = weights.get(event["name"].removesuffix("_kernel_time"), 0)
    if op in WEIGHT_OPS or (op in MATMULS and nbytes >= WEIGHT_MIN_BYTES):  # a MatMul on a weight matrix
        return "weights", nbytes
    if op in MATMULS or op in ATTENTION_OPS:
        return "attention", 0
    if op in QUANT_OPS:
        return "quantize", 0
    if op == "Concat" and len(_shapes(event, "output_type_shape")[0][1]) == 4:
        return "kv copy", 0
    if op in NORM_OPS:
        return "norms + act", 0
    return "small ops", 0


def summarize(trace: list[dict], runs: int, weights: dict[str, int], per: int | None = None) -> dict:
    """Per-op and per-category milliseconds over the last `runs` model_run events, divided by `per`
    (default `runs`: per run; 1: their total, a prefill run in chunks)."""
    per = per or runs
    model_runs = [e for e in trace if e.get("name") == "model_run"][-runs:]
    start = model_runs[0]["ts"]
    kernels = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]
    per_op: dict[str, float] = defaultdict(float)
    per_cat: dict[str, float] = defaultdict(float)
    weight_bytes = 0
    for e in kernels:
        cat, nbytes = categorize(e, weights)
        per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / per
        per_cat[cat] += e["dur"] / 1e3 / per
        weight_bytes += nbytes
    run_ms = sum(e["dur"] for e in model_runs) / 1e3 / per
    per_cat["executor"] = run_ms - sum(per_cat.values())
    return {"run_ms": run_ms, "per_op": dict(per_op), "per_cat": dict(per_cat),
            "weight_mb": weight_bytes / per / 1e6, "nodes": len(kernels) // per}


def profile(bundle_path: Path, context: int, steps: int, warmup: int, threads: int) -> dict:
    """One bundle at one context: the prefill run and `steps` decode steps, profiled."""
    from gptdeploy.bundle import Bundle
    from gptdeploy.runtimes.ort import OrtRuntime
    from gptdeploy.runtimes.ort_session import session_options
    from gptdeploy.steps import Steps

    class Profiled(OrtRuntime):
        def _session_options(self, threads):
            so = session_options(threads)
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tmp) / "ort")
            return so

    bundle = Bundle.load(bundle_path)
    vocab = bundle.manifest.tokenizer.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, context)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        rt = Profiled(bundle, bundle.graph(), threads)
        chain = Steps(rt, ids, pad_id=0, room=warmup + steps)
        out = chain.prefill()
        walls = []
        for _ in range(warmup + steps):
            nxt = out.logits.argmax(-1)  # (1,)
            t0 = time.perf_counter()
            out = chain.decode(nxt)
            walls.append(time.perf_counter() - t0)
        trace = json.loads(Path(rt._session.end_profiling()).read_text())
        rt.close()
    weights = weight_bytes(bundle.file(bundle.graph().file))
    decode = summarize(trace, steps, weights)
    decode["wall_ms"] = statistics.mean(walls[warmup:]) * 1e3
    decode["per_cat"]["python"] = decode["wall_ms"] - decode["run_ms"]
    runs = [e for e in trace if e.get("name") == "model_run"]
    calls = -(-context // (rt.prefill_chunk or context))  # the prefill's runs: one per chunk
    prefill = summarize([e for e in trace if e["ts"] < runs[calls]["ts"]], calls, weights, per=1)
    return {"bundle": str(bundle_path), "context": context, "decode": decode, "prefill": prefill}


def bandwidth(mb: int = 256, repeats: int = 5) -> dict[str, float]:
    """GB/s of a numpy copy (read + write counted) and of a column sum (read only: streaming
    SIMD adds, faster than a flat sum's pairwise loop), on 1 and 2 threads (each thread takes its
    half of the buffers; numpy releases the GIL for both)."""
    n = mb * (1 << 20) // 4
    src, dst = np.ones(n, np.float32), np.zeros(n, np.float32)
    out = {}
    for threads in (1, 2):
        half = n // threads // 4096 * 4096
        spans = [(i * half, (i + 1) * half) for i in range(threads)]
        for kind, fn, factor in (("copy", lambda a, b: np.copyto(dst[a:b], src[a:b]), 2),
                                 ("read", lambda a, b: src[a:b].reshape(-1, 4096).sum(axis=0), 1)):
            best = float("inf")
            for _ in range(repeats):
                workers = [threading.Thread(target=fn, args=span) for span in spans]
                t0 = time.perf_counter()
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                best = min(best, time.perf_counter() - t0)
            out[f"{kind} {threads} thread{'s' if threads > 1 else ''}"] = round(factor * half * threads * 4 / best / 1e9, 1)
    return out


def table(results: list[dict]) -> str:
    """One markdown table: a column per (bundle, context), a row per category and per big op."""
    cols = [f"{Path(r['bundle']).name} @{r['context']}" for r in results]
    lines = ["| ms per decode step | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for cat in CATEGORIES:
        lines.append(f"| {cat} | " + " | ".join(f"{r['decode']['per_cat'].get(cat, 0.0):.2f}" for r in results) + " |")
    lines.append("| **wall** | " + " | ".join(f"**{r['decode']['wall_ms']:.2f}**" for r in results) + " |")
    lines.append("| weights MB read | " + " | ".join(f"{r['decode']['weight_mb']:.0f}" for r in results) + " |")
    lines.append("| weights GB/s | " + " | ".join(
        f"{r['decode']['weight_mb'] / max(r['decode']['per_cat'].get('weights', 0), 1e-9):.1f}" for r in results) + " |")
    lines.append("| kernels per step | " + " | ".join(str(r["decode"]["nodes"]) for r in results) + " |")
    ops = sorted({op for r in results for op in r["decode"]["per_op"]},
                 key=lambda op: -max(r["decode"]["per_op"].get(op, 0) for r in results))
    for op in ops[:12]:
        lines.append(f"| `{op}` | " + " | ".join(f"{r['decode']['per_op'].get(op, 0.0):.2f}" for r in results) + " |")
    lines.append("| prefill run ms | " + " | ".join(f"{r['prefill']['run_ms']:.0f}" for r in results) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="*", type=Path)
    ap.add_argument("--context", default="32,512", help="comma-separated prompt lengths")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bandwidth", action="store_true", help="measure memory bandwidth first")
    ap.add_argument("--json", type=Path, help="write every number here too")
    args = ap.parse_args()
    if args.bandwidth:
        print("memory bandwidth GB/s (256 MiB buffers, best of 5):", json.dumps(bandwidth()))
    contexts = [int(c) for c in args.context.split(",")]
    results = [profile(b, c, args.steps, args.warmup, args.threads) for c in contexts for b in args.bundles]
    if results:
        print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
