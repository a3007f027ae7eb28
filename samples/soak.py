"""Soak: N consecutive generations of L tokens from one Generator, watching resident memory.

    python samples/soak.py                      # 200 x 256 on a tiny seeded bundle built here
    python samples/soak.py --bundle DIR -n 50 -l 128

Resident memory (VmRSS) is read after a warm-up (onnxruntime's arenas and caches grow over the
first runs) and at the end; the growth between the two is what a leak would show. Linux only
(/proc/self/status). Without --bundle, a 2-layer random GPT-2 with 320 positions is exported
first (that part needs torch); the soak itself runs in a fresh process on numpy + onnxruntime.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROMPTS = ("The quick brown fox", "你好，世界", "Numbers 0123 and (brackets)", "A deploy bundle carries")


def rss_kib() -> int:
    """This process's resident set size, KiB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


@dataclass
class SoakReport:
    generations: int
    tokens: int  # generated in all (a generation may end early at end-of-text)
    warmup: int
    rss_start_kib: int  # after the Generator is loaded, before any generation
    rss_warm_kib: int  # after the warm-up generations
    rss_end_kib: int
    rss_peak_kib: int  # highest reading, sampled every 10 generations
    seconds: float

    @property
    def growth_pct(self) -> float:
        return 100.0 * (self.rss_end_kib - self.rss_warm_kib) / self.rss_warm_kib

    def describe(self) -> str:
        return (f"{self.generations} generations, {self.tokens} tokens in {self.seconds:.1f} s; VmRSS "
                f"{self.rss_start_kib / 1024:.1f} MiB loaded, {self.rss_warm_kib / 1024:.1f} MiB after "
                f"{self.warmup} warm-up runs, {self.rss_end_kib / 1024:.1f} MiB at the end "
                f"(peak {self.rss_peak_kib / 1024:.1f} MiB): growth {self.growth_pct:+.2f}% after warm-up")


def soak(gen, generations: int, length: int, warmup: int = 10) -> SoakReport:
    """Run `generations` greedy generations of up to `length` tokens on `gen`, cycling prompts."""
    gc.collect()
    start = rss_kib()
    warm = peak = start
    tokens = 0
    t0 = time.perf_counter()
    for i in range(generations):
        result = gen.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=length)
        tokens += result.timings.tokens
        if i + 1 == warmup:
            gc.collect()
            warm = rss_kib()
        if i % 10 == 0:
            peak = max(peak, rss_kib())
    gc.collect()
    end = rss_kib()
    return SoakReport(generations, tokens, warmup, start, warm if warmup else start, end, max(peak, end),
                      time.perf_counter() - t0)


def tiny_bundle(directory: Path, n_positions: int) -> Path:
    """A 2-layer random GPT-2 bundle (export tooling from the test suite; needs torch)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.factories import make_hf_gpt2_dir
    from tests.runtime_bundles import write_bundle

    src = make_hf_gpt2_dir(directory / "src", n_layer=2, n_head=2, n_embd=32, n_positions=n_positions, seed=0)
    return write_bundle(src, directory / "bundle")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="Bundle to run (default: a tiny one built here).")
    p.add_argument("-n", "--generations", type=int, default=200)
    p.add_argument("-l", "--length", type=int, default=256, help="Tokens per generation.")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    if args.bundle is None:
        # Build with torch here, measure in a fresh process without it: torch's ~330 MiB
        # would otherwise be most of the baseline and hide a leak.
        with tempfile.TemporaryDirectory() as tmp:
            bundle = tiny_bundle(Path(tmp), n_positions=args.length + 64)
            sys.exit(subprocess.run([sys.executable, __file__, "--bundle", str(bundle), *sys.argv[1:]], check=False).returncode)

    from gptdeploy import Generator

    with Generator.load(args.bundle, threads=args.threads) as gen:
        report = soak(gen, args.generations, args.length, args.warmup)
    if args.json:
        print(json.dumps(asdict(report) | {"growth_pct": report.growth_pct}, indent=2))
    else:
        print(report.describe())


if __name__ == "__main__":
    main()
