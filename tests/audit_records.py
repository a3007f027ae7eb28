"""Synthetic audit records for the log, format and report tests: softmax rows over a causal
mask, seeded, no model needed. Labels mix English, CJK split over byte tokens, and markup."""

from __future__ import annotations

import numpy as np

from gptdeploy.audit import AuditRecord, Tokens

PROMPT_LABELS = ["他", "喜欢[1/2]", "喜欢[2/2]", " eats", "<b>x</b>", "\n"]
OUTPUT_LABELS = ["吃", " apples", "。", "<|endoftext|>"]


def causal_softmax(rng: np.random.Generator, heads: int, S: int, scale: float = 2.0) -> np.ndarray:
    """(heads, S, S) float32 rows that sum to 1, zero above the diagonal."""
    x = rng.normal(scale=scale, size=(heads, S, S))
    x = np.where(np.tril(np.ones((S, S), bool)), x, -np.inf)
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def synthetic_record(seed: int = 0, n_layer: int = 2, n_head: int = 3, dtype: str = "float32",
                     prompt_labels: list[str] = PROMPT_LABELS, output_labels: list[str] = OUTPUT_LABELS,
                     prompt_text: str = "他喜欢 eats<b>x</b>\n") -> AuditRecord:
    rng = np.random.default_rng(seed)
    n_p, n_o = len(prompt_labels), len(output_labels)
    S = n_p + n_o - 1
    prompt = Tokens(prompt_text, list(range(10, 10 + n_p)), [f"v{i}" for i in range(n_p)], list(prompt_labels))
    output = Tokens("吃 apples。", list(range(50 + seed, 50 + seed + n_o)), [f"w{i}" for i in range(n_o)],
                    list(output_labels))
    return AuditRecord(
        prompt=prompt, output=output, finish_reason="eos",
        sampling={"temperature": 0.7, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.0, "seed": seed,
                  "max_new_tokens": n_o, "stop": [], "stop_token_ids": []},
        model={"bundle_manifest_sha256": "ab" * 32, "source": {"kind": "synthetic", "name": "unit", "sha256": "cd" * 32},
               "config": {"n_layer": n_layer, "n_head": n_head}, "graph": "fp32", "precision": "fp32"},
        runtime={"backend": "none", "versions": {"numpy": np.__version__}},
        time="2026-01-01T00:00:00.000000+00:00",
        layers=list(range(n_layer)), heads=list(range(n_head)), dtype=dtype,
        attention=[causal_softmax(rng, n_head, S) for _ in range(n_layer)],
    )
