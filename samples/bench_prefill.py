"""Prefill time of the `ort` runtime per chunk size: the measurement behind runtimes/ort.PREFILL_CHUNK.

    python samples/bench_prefill.py BUNDLE [BUNDLE ...] [--prompt-len 512,1536] [--chunks 0,128,256,512]
                                    [--rounds 5] [--threads 2]

Each bundle is loaded once per chunk size (0: the whole prompt in one call); the rounds
interleave the chunk sizes, so a noisy neighbour slows every setting alike, and the table gives
the median prefill ms of one batch-1 prompt of random ids (the TTFT's graph part), with its ratio
to the one-call prefill. Compare settings within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from gptdeploy.bundle import Bundle
from gptdeploy.runtimes.ort import OrtRuntime, tiled_attention
from gptdeploy.steps import Steps


def measure(bundle_path: Path, prompt_lens: list[int], chunks: list[int], rounds: int, threads: int) -> list[dict]:
    bundle = Bundle.load(bundle_path)
    # every chunk size on the attention kernel the runtime picks for its own chunks (a whole
    # long prompt alone would pick the tiled one: runtimes/ort_session.py)
    flash = tiled_attention(bundle.config)
    runtimes = {c: OrtRuntime(bundle, bundle.graph(), threads, prefill_chunk=c or None, gqa_flash=flash) for c in chunks}
    vocab = bundle.manifest.tokenizer.vocab_size
    times: dict[tuple[int, int], list[float]] = {(t, c): [] for t in prompt_lens for c in chunks}
    try:
        for r in range(rounds + 1):  # round 0 warms every session up at every length
            for t in prompt_lens:
                ids = np.random.default_rng(r).integers(0, vocab, size=(1, t)).tolist()  # one prompt of T ids
                for c, rt in runtimes.items():
                    start = time.perf_counter()
                    Steps(rt, ids, pad_id=0, room=1).prefill()
                    if r:
                        times[(t, c)].append(time.perf_counter() - start)
                    rt.reset()
    finally:
        for rt in runtimes.values():
            rt.close()
    rows = []
    for t in prompt_lens:
        whole = statistics.median(times[(t, chunks[0])])
        for c in chunks:
            ms = statistics.median(times[(t, c)])
            rows.append({"bundle": str(bundle_path), "prompt": t, "chunk": c or "whole", "ms": round(1e3 * ms, 1),
                         "x_first": round(ms / whole, 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--prompt-len", default="512,1536", help="comma-separated prompt lengths")
    ap.add_argument("--chunks", default="0,128,256,512", help="comma-separated chunk sizes; 0 = one call (the ratio's base when first)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args = ap.parse_args()
    lens = [int(x) for x in args.prompt_len.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    rows = [row for b in args.bundles for row in measure(b, lens, chunks, args.rounds, args.threads)]
    print(f"| bundle | prompt | chunk | prefill ms (median of {args.rounds}) | x chunk {chunks[0] or 'whole'} |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bundle']} | {r['prompt']} | {r['chunk']} | {r['ms']} | {r['x_first']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
