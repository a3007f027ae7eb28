"""Precision variants side by side, in one run on one machine: decode tokens/s, prefill time, size.

    python samples/make_gpt2_124m.py --out out/gpt2-124m --no-bundle      # the random-init 124M source
    python samples/bench_precision.py --source out/gpt2-124m/source --out out/precision
    python samples/bench_precision.py --bundle before=DIR --bundle after=DIR --prompt-len 32,512

Exports (once; reused when present) fp32 audit, fp32 with all logits, fp32 fused (no attention
outputs), int8 and int4 (audit and fused) bundles of SOURCE, then measures each through the
`ort` runtime (the one the Generator uses): batch 1, prompt 32, 128 new tokens, greedy, no
early stop, `--threads` threads; prefill at prompt 512 with last-position vs all logits.
One runtime is open at a time: an idle onnxruntime session's thread pool keeps spinning for
a while after each run and steals the cores from any other session (measured: interleaving
the steps of four open sessions cut fp32 from 43 to 15 tokens/s). Rounds alternate the
bundles so that load from other processes spreads over all rows; each figure is the median
over `--rounds` runs, each run after one untimed warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

VARIANTS = {  # name -> export_bundle options
    "fp32": {},
    "fp32 all-logits": {"last_logits_only": False},
    "fp32 fused": {"attentions": False},
    "int8": {"precision": "int8"},
    "int8 fused": {"precision": "int8", "attentions": False},
    "int4": {"precision": "int4"},
    "int4 fused": {"precision": "int4", "attentions": False},
}


def export_all(source: Path, out: Path) -> dict[str, Path]:
    from gptdeploy.bundle import Bundle
    from gptdeploy.errors import BundleError
    from gptdeploy.exporters.export import export_bundle

    paths = {}
    for name, options in VARIANTS.items():
        path = out / name.replace(" ", "-")
        try:
            Bundle.load(path)
        except BundleError:
            t0 = time.perf_counter()
            export_bundle(source, path, force=True, **options)
            print(f"exported {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        paths[name] = path
    return paths


def decode_rate(bundle, threads: int, prompt: np.ndarray, new_tokens: int) -> float:
    """Decode tokens/s after the first token: greedy, no early stop, one warm-up run first."""
    from gptdeploy.runtimes.backends import open_runtime

    B, T = prompt.shape
    with open_runtime(bundle, "ort", threads=threads) as rt:
        for timed in (False, True):
            out = rt.prefill(prompt, np.ones((B, T), np.int64), np.arange(T, dtype=np.int64)[None].repeat(B, 0))
            t0 = time.perf_counter()
            for step in range(new_tokens - 1):
                nxt = out.logits.argmax(-1)[:, None].astype(np.int64)  # (B, 1)
                S = T + step + 1
                out = rt.decode(nxt, np.ones((B, S), np.int64), np.full((B, 1), S - 1, np.int64))
            seconds = time.perf_counter() - t0
    return (new_tokens - 1) * B / seconds


def prefill_seconds(bundle, threads: int, prompt: np.ndarray, runs: int) -> float:
    """Median prefill seconds over `runs`, after one warm-up."""
    from gptdeploy.runtimes.backends import open_runtime

    B, T = prompt.shape
    args = (prompt, np.ones((B, T), np.int64), np.arange(T, dtype=np.int64)[None].repeat(B, 0))
    times = []
    with open_runtime(bundle, "ort", threads=threads) as rt:
        for r in range(runs + 1):
            t0 = time.perf_counter()
            rt.prefill(*args)
            if r:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(bundles: dict, threads: int, prompts: dict[int, np.ndarray], new_tokens: int, rounds: int) -> dict:
    """{(name, prompt length): {"decode": [tok/s per round], "ttft": [s per round]}}, rounds alternating
    the order of the bundles so that load from other processes spreads over every row."""
    out = {(k, n): {"decode": [], "ttft": []} for k in bundles for n in prompts}
    for r in range(rounds):
        for k in (list(bundles) if r % 2 == 0 else list(bundles)[::-1]):
            for n, prompt in prompts.items():
                out[k, n]["decode"].append(decode_rate(bundles[k], threads, prompt, new_tokens))
                out[k, n]["ttft"].append(prefill_seconds(bundles[k], threads, prompt, runs=3))
        print(f"round {r + 1}: " + ", ".join(f"{k}@{n} {v['decode'][-1]:.1f} tok/s {v['ttft'][-1] * 1e3:.0f} ms"
                                             for (k, n), v in out.items()), flush=True)
    return out


def compare(args) -> None:
    """--bundle NAME=PATH ...: decode tok/s and TTFT of existing bundles at each --prompt-len."""
    from gptdeploy.bundle import Bundle

    bundles = {spec.split("=", 1)[0]: Bundle.load(Path(spec.split("=", 1)[1])) for spec in args.bundle}
    vocab = next(iter(bundles.values())).manifest.tokenizer.vocab_size
    rng = np.random.default_rng(0)
    prompts = {int(n): rng.integers(0, vocab, size=(args.batch, int(n)), dtype=np.int64) for n in args.prompt_len.split(",")}
    result = measure(bundles, args.threads, prompts, args.new_tokens, args.rounds)
    print(f"\n{'bundle':<24} {'prompt':>6} {'decode tok/s med':>16} {'best':>7} {'TTFT ms med':>12} {'best':>7}")
    for (k, n), v in result.items():
        print(f"{k:<24} {n:>6} {statistics.median(v['decode']):>16.1f} {max(v['decode']):>7.1f} "
              f"{statistics.median(v['ttft']) * 1e3:>12.1f} {min(v['ttft']) * 1e3:>7.1f}")
    if args.json:
        args.json.write_text(json.dumps({f"{k}@{n}": v for (k, n), v in result.items()}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, help="export every variant of this source (or use --bundle)")
    ap.add_argument("--bundle", action="append", default=[], help="NAME=PATH of an existing bundle; repeatable")
    ap.add_argument("--json", type=Path, help="--bundle mode: write every round's figures here")
    ap.add_argument("--batch", type=int, default=1, help="--bundle mode: rows decoded together (tok/s counts them all)")
    ap.add_argument("--out", type=Path, default=Path("out/precision"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", default="32", help="--bundle mode: comma-separated prompt lengths")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=512)
    args = ap.parse_args()
    if args.bundle:
        return compare(args)
    if args.source is None:
        ap.error("give --source (export and measure every variant) or --bundle NAME=PATH")

    from gptdeploy.bundle import Bundle

    args.out.mkdir(parents=True, exist_ok=True)
    bundles = {k: Bundle.load(p) for k, p in export_all(args.source, args.out).items()}
    vocab = next(iter(bundles.values())).manifest.tokenizer.vocab_size
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, size=(1, int(args.prompt_len)), dtype=np.int64)
    long_prompt = rng.integers(0, vocab, size=(1, args.prefill_len), dtype=np.int64)

    decoded = [k for k in bundles if k != "fp32 all-logits"]
    decode: dict[str, list[float]] = {k: [] for k in decoded}
    prefill: dict[str, list[float]] = {"fp32": [], "fp32 all-logits": []}
    for r in range(args.rounds):
        order = decoded if r % 2 == 0 else decoded[::-1]
        for k in order:
            decode[k].append(decode_rate(bundles[k], args.threads, prompt, args.new_tokens))
        for k in (list(prefill) if r % 2 == 0 else list(prefill)[::-1]):
            prefill[k].append(prefill_seconds(bundles[k], args.threads, long_prompt, runs=3))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in decode.items())
              + ", prefill " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in prefill.items()), flush=True)
    pre = {k: statistics.median(v) for k, v in prefill.items()}

    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.iterdir())

    med = {k: statistics.median(v) for k, v in decode.items()}
    base_size = size(bundles["fp32"].path)
    rows = [{
        "bundle": k, "decode_tokens_per_s": round(v, 1), "spread": [round(min(decode[k]), 1), round(max(decode[k]), 1)],
        "vs_fp32": round(v / med["fp32"], 2), "size_mb": round(size(bundles[k].path) / 1e6, 1),
        "size_vs_fp32": round(size(bundles[k].path) / base_size, 3),
    } for k, v in med.items()]
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "settings": {"batch": 1, "prompt": int(args.prompt_len), "new_tokens": args.new_tokens, "rounds": args.rounds},
        "decode": rows,
        "prefill": {
            "prompt": args.prefill_len,
            "last_logits_s": round(pre["fp32"], 4), "all_logits_s": round(pre["fp32 all-logits"], 4),
            "speedup": round(pre["fp32 all-logits"] / pre["fp32"], 2),
        },
    }
    print(json.dumps(report, indent=2))
    print(f"\n{'bundle':<12} {'decode tok/s':>13} {'x fp32':>7} {'MB':>7} {'x size':>7}")
    for row in rows:
        print(f"{row['bundle']:<12} {row['decode_tokens_per_s']:>13.1f} {row['vs_fp32']:>7.2f} "
              f"{row['size_mb']:>7.1f} {row['size_vs_fp32']:>7.3f}")
    p = report["prefill"]
    print(f"prefill {p['prompt']}: last logits {p['last_logits_s'] * 1e3:.0f} ms, all logits "
          f"{p['all_logits_s'] * 1e3:.0f} ms ({p['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
