"""The `ort` runtime's settings side by side: prefill time and decode tokens/s of each variant,
interleaved in one process.

    python samples/bench_variants.py BUNDLE [BUNDLE ...] [--variants default,gqa-flash,sleeping]
                                     [--context 32,512] [--steps 64] [--rounds 5] [--threads 2]

Variants (the first is each row's baseline):
  default     the runtime as shipped
  gqa-flash   onnxruntime's tiled ("flash") GroupQueryAttention kernel, which the runtime turns
              off (runtimes/ort_session.py)
  no-flash    the materializing GroupQueryAttention kernel, forced (the shipped default for
              models whose whole context keeps its probabilities small, ort_session.PROBS_BUDGET)
  sleeping    onnxruntime's intra-op threads sleep between kernels instead of spinning
              (`session.intra_op.allow_spinning` 0). A decode step runs ~100-250 small kernels;
              between them a spinning worker is ready at once, a sleeping one must be woken

Each round opens every variant's runtime afresh, in an order that alternates between rounds (a
noisy neighbour slows every variant alike), prefills `context` random ids in one batch-1 prompt
(the TTFT's graph part, in the runtime's chunks) and times `--steps` greedy decode steps after 8
untimed ones. The table gives medians over the rounds and each variant's ratio to the first.
Compare variants within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from gptdeploy.bundle import Bundle
from gptdeploy.runtimes.ort import OrtRuntime
from gptdeploy.runtimes.ort_session import session_options
from gptdeploy.steps import Steps


class Sleeping(OrtRuntime):
    def _session_options(self, threads):
        so = session_options(threads)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so


VARIANTS = {  # name -> (runtime class, its keyword arguments)
    "default": (OrtRuntime, {}),
    "gqa-flash": (OrtRuntime, {"gqa_flash": True}),
    "no-flash": (OrtRuntime, {"gqa_flash": False}),
    "sleeping": (Sleeping, {}),
}


def one_round(bundle: Bundle, variant: str, ids: list[list[int]], steps: int, threads: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one fresh runtime of `variant`."""
    cls, kwargs = VARIANTS[variant]
    with cls(bundle, bundle.graph(), threads=threads, **kwargs) as rt:
        chain = Steps(rt, ids, pad_id=0, room=8 + steps)
        t0 = time.perf_counter()
        out = chain.prefill()
        prefill = time.perf_counter() - t0
        for s in range(8 + steps):  # 8 untimed steps first
            if s == 8:
                t0 = time.perf_counter()
            out = chain.decode(out.logits.argmax(-1))
        return prefill, steps / (time.perf_counter() - t0)


def measure(path: Path, variants: list[str], contexts: list[int], steps: int, rounds: int, threads: int) -> list[dict]:
    bundle = Bundle.load(path)
    vocab = bundle.manifest.tokenizer.vocab_size
    if max(contexts) + 8 + steps > bundle.config.block_size:
        raise SystemExit(f"{path}: context {max(contexts)} + {8 + steps} decode steps exceeds the model's "
                         f"{bundle.config.block_size} positions; lower --context or --steps")
    rows = []
    for ctx in contexts:
        ids = np.random.default_rng(ctx).integers(0, vocab, (1, ctx)).tolist()  # one prompt of ctx ids
        one_round(bundle, variants[0], ids, 4, threads)  # warm the page cache and the allocator
        got: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for r in range(rounds):
            for v in variants if r % 2 == 0 else variants[::-1]:
                got[v].append(one_round(bundle, v, ids, steps, threads))
        base_ms = statistics.median(p for p, _ in got[variants[0]]) * 1e3
        base_rate = statistics.median(d for _, d in got[variants[0]])
        for v in variants:
            ms = statistics.median(p for p, _ in got[v]) * 1e3
            rate = statistics.median(d for _, d in got[v])
            rows.append({"bundle": str(path), "context": ctx, "variant": v, "prefill_ms": round(ms, 1),
                         "prefill_x": round(ms / base_ms, 3), "decode_tok_s": round(rate, 1),
                         "decode_x": round(rate / base_rate, 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--variants", default="default,gqa-flash", help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--context", default="32,512", help="comma-separated prompt lengths (the decode's context)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    contexts = [int(c) for c in args.context.split(",")]
    print(f"| bundle | context | variant | prefill ms | x {variants[0]} | decode tok/s | x {variants[0]} |")
    print("|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for b in args.bundles:  # each bundle's rows as soon as they are measured
        rows += measure(b, variants, contexts, args.steps, args.rounds, args.threads)
        for r in (r for r in rows if r["bundle"] == str(b)):
            print(f"| {b.name} | {r['context']} | {r['variant']} | {r['prefill_ms']} | {r['prefill_x']:.2f} "
                  f"| {r['decode_tok_s']} | {r['decode_x']:.2f} |", flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    print(f"(medians of {args.rounds} rounds, {args.threads} threads, {args.steps} decode steps, batch 1)")


if __name__ == "__main__":
    main()
