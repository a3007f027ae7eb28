"""What the Generator costs over a bare onnxruntime loop on the same graph, measured in one run.

    python samples/bench_runtime_overhead.py BUNDLE [--threads 2] [--prompt-tokens 32] [--new-tokens 128]

Greedy decoding, batch 1. Three contenders, interleaved round by round so that machine noise
hits each alike:

- `generator`: gptdeploy.Generator (backend ort): IOBinding, KV cache kept as OrtValues.
- `bare`: the loop users write first: `sess.run(None, numpy feeds)`, presents fed back as numpy.
- `bare-lean`: the same loop asking only for logits and presents (no attention outputs).

Both bare loops use the same SessionOptions as the runtime (threads, optimization level), so
only the loop differs. Decode tokens/s counts the tokens after the first over the time after
the first. Neither stops at EOS (a random-init model may emit it after a dozen tokens), so every
round decodes exactly --new-tokens; the bare loops must produce the Generator's token ids
(argmax over the tokenizer's columns, as the Generator does). Prints one line per contender
and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import tokenizers

from gptdeploy import contract as io
from gptdeploy.bundle import Bundle
from gptdeploy.generate import Generator
from gptdeploy.runtimes.backends import open_runtime
from gptdeploy.runtimes.ort import tiled_attention
from gptdeploy.runtimes.ort_session import open_session, session_options
from gptdeploy.tokenizer import Tokenizer

PROMPT_TEXT = (
    "Once upon a time, there was a little fox who lived by the river. Every morning she ran to "
    "the water and looked at the fish. 有一天，她看见一只小鸟在树上唱歌。"
)


def prompt_ids(gen: Generator, n: int) -> list[int]:
    ids = gen.tokenizer.encode(PROMPT_TEXT)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def bare_loop(sess: ort.InferenceSession, bundle: Bundle, prompt: list[int], steps: int, lean: bool):
    """Greedy decoding with plain sess.run and numpy feeds. -> (token ids, decode tokens/s)"""
    sig = bundle.graph().signature
    V = bundle.manifest.tokenizer.vocab_size  # the Generator never picks padding columns either
    outputs = [io.LOGITS, *sig.present_names()] if lean else None
    ids = np.array([prompt], dtype=np.int64)  # (1, T)
    empty = np.zeros((1, sig.kv_heads, 0, sig.head_dim), dtype=np.float32)
    feeds = {
        io.INPUT_IDS: ids,
        io.ATTENTION_MASK: np.ones_like(ids),
        io.POSITION_IDS: np.arange(ids.shape[1], dtype=np.int64)[None],
        **{name: empty for name in sig.past_names()},
    }
    out = sess.run(outputs, feeds)
    token = int(out[0][0, -1, :V].argmax())
    t_first = time.perf_counter()
    tokens = [token]
    n = len(prompt)
    for _ in range(steps - 1):
        feeds = {
            io.INPUT_IDS: np.array([[token]], dtype=np.int64),
            io.ATTENTION_MASK: np.ones((1, n + 1), dtype=np.int64),
            io.POSITION_IDS: np.array([[n]], dtype=np.int64),
            **dict(zip(sig.past_names(), out[1 : 1 + len(sig.past_names())])),
        }
        out = sess.run(outputs, feeds)
        token = int(out[0][0, -1, :V].argmax())
        tokens.append(token)
        n += 1
    elapsed = time.perf_counter() - t_first
    return tokens, (steps - 1) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    bundle = Bundle.load(args.bundle)
    entry = bundle.manifest.tokenizer
    raw = tokenizers.Tokenizer.from_file(str(bundle.file(entry.file)))
    no_eos = Tokenizer(raw, replace(entry, eos_token_id=None))  # decode all --new-tokens
    gen = Generator(open_runtime(bundle, "ort", threads=args.threads), no_eos, bundle)
    sess = open_session(bundle.file(bundle.graph().file), session_options(args.threads),
                        flash_default=tiled_attention(bundle.config))  # the runtime's kernels
    prompt = prompt_ids(gen, args.prompt_tokens)
    # Warm-up: first runs pay for allocator arenas and page faults of the weights.
    gen.generate_ids([prompt], max_new_tokens=8)
    bare_loop(sess, bundle, prompt, 8, lean=False)

    rates: dict[str, list[float]] = {"generator": [], "bare": [], "bare-lean": []}
    for _ in range(args.rounds):
        result = gen.generate_ids([prompt], max_new_tokens=args.new_tokens)[0]
        rates["generator"].append(result.timings.decode_tokens_per_s)
        steps = len(result.token_ids)
        assert steps == args.new_tokens, result.finish_reason
        for name, lean in (("bare", False), ("bare-lean", True)):
            tokens, rate = bare_loop(sess, bundle, prompt, steps, lean)
            if tokens != result.token_ids:
                raise SystemExit(
                    f"{name} loop produced other tokens than the Generator: the comparison is void"
                )
            rates[name].append(rate)

    # On a shared machine other work comes and goes: the ratio is taken within each round (the
    # contenders ran back to back) and its median reported; best-of-rounds (as timeit's min)
    # and median rates are printed beside it.
    best = {k: max(v) for k, v in rates.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in rates.items():
        print(
            f"{k:>10}: best {best[k]:8.2f}, median {med[k]:8.2f} decode tokens/s "
            f"({len(v)} rounds: {', '.join(f'{x:.1f}' for x in v)})"
        )

    def ratio(other: str) -> dict:
        paired = statistics.median(g / o for g, o in zip(rates["generator"], rates[other]))
        return {"paired_median": round(paired, 3), "best": round(best["generator"] / best[other], 3)}

    summary = {
        "bundle": str(bundle.path),
        "threads": args.threads,
        "prompt_tokens": len(prompt),
        "new_tokens": steps,
        "rounds": args.rounds,
        "decode_tokens_per_s_best": {k: round(v, 2) for k, v in best.items()},
        "decode_tokens_per_s_median": {k: round(v, 2) for k, v in med.items()},
        "ratio_generator_vs_bare": ratio("bare"),
        "ratio_generator_vs_bare_lean": ratio("bare-lean"),
    }
    print(json.dumps(summary, indent=2))
    gen.close()


if __name__ == "__main__":
    main()
