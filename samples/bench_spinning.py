"""Decode tokens/s with onnxruntime's intra-op threads spinning between kernels (its default, and
gptdeploy's) and sleeping instead (`session.intra_op.allow_spinning` 0), interleaved in one process.

    python samples/bench_spinning.py BUNDLE [--threads 2] [--context 32] [--rounds 6]

A decode step runs ~100-250 small kernels; between them a spinning worker is ready at once, a
sleeping one must be woken. On cores that other processes also want, spinning steals their time
slices instead (docs/performance.md has one run of each kind).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()

    from gptdeploy.bundle import Bundle
    from gptdeploy.runtimes.ort import OrtRuntime, session_options
    from gptdeploy.steps import Steps

    class Sleeping(OrtRuntime):
        def _session_options(self, threads):
            so = session_options(threads)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return so

    bundle, ctx = Bundle.load(args.bundle), args.context
    ids = np.random.default_rng(0).integers(0, bundle.manifest.tokenizer.vocab_size, (1, ctx)).tolist()
    rates: dict[str, list[float]] = {"spinning": [], "sleeping": []}
    kinds = [("spinning", OrtRuntime), ("sleeping", Sleeping)]
    for r in range(args.rounds):
        for name, cls in kinds if r % 2 == 0 else kinds[::-1]:
            with cls(bundle, bundle.graph(), threads=args.threads) as rt:
                steps = Steps(rt, ids, pad_id=0, room=8 + args.steps)
                out = steps.prefill()
                for s in range(8 + args.steps):  # 8 untimed steps first
                    if s == 8:
                        t0 = time.perf_counter()
                    out = steps.decode(out.logits.argmax(-1))
                rates[name].append(args.steps / (time.perf_counter() - t0))
    for name, v in rates.items():
        print(f"{name:>9}: median {statistics.median(v):7.1f}, best {max(v):7.1f} decode tok/s "
              f"({args.threads} threads, context {ctx}, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
