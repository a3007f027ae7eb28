"""Next-token choice from host logits: greedy, temperature, top-k, top-p, repetition penalty.

numpy only. `temperature == 0` is greedy (argmax); any `temperature > 0` samples, after the
processors in Hugging Face's order: repetition penalty, temperature, top-k, top-p.
Shapes: B batch, V tokenizer vocab (padding columns already cut off by the caller).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gptdeploy.errors import GenerationError, RuntimeFailure

# Top-p over a 50k vocabulary: a full sort costs ~3 ms a row; the nucleus almost always lies in
# the few hundred most likely tokens, so we sort those first and fall back to the full sort.
_NUCLEUS_PREFILTER = 256


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. The defaults are greedy decoding."""

    temperature: float = 0.0  # 0: greedy (argmax, seed unused); > 0: sample softmax(logits / temperature)
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1.0: off
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019) on prompt + generated ids; 1.0: off
    seed: int | None = None  # None: the Generator draws one per call and reports it in the result

    def __post_init__(self) -> None:
        problems = []
        if not _real(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if not _integer(self.top_k) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not _real(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if not _real(self.repetition_penalty) or self.repetition_penalty <= 0:
            problems.append(
                f"repetition_penalty must be a number > 0 (1 turns it off), got {self.repetition_penalty!r}"
            )
        if self.seed is not None and (not _integer(self.seed) or self.seed < 0):
            problems.append(f"seed must be a non-negative integer or None, got {self.seed!r}")
        if problems:
            raise GenerationError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class Sampler:
    """Picks one token per row; owns a random stream (PCG64, seeded) that draws one number per row
    per call. The engine gives every request a Sampler of its own (one row), so a request samples
    the same alone or in a batch; options.row_sampling seeds the rows of a multi-prompt call."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.Generator(np.random.PCG64(params.seed))

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None) -> np.ndarray:
        """logits (B, V) float32; seen (B, V) bool ids already in each row, for the penalty. -> (B,) int64"""
        p = self.params
        if p.repetition_penalty != 1.0 and seen is not None:
            logits = penalize(logits, seen, p.repetition_penalty)
        if math.isnan(logits.max()):  # max propagates NaN: one reduction, not an elementwise mask
            raise RuntimeFailure("the model produced NaN logits; the graph or its weights are broken")
        if p.greedy:
            return logits.argmax(axis=1)  # (B,), first index on ties, like torch.argmax
        u = self.rng.random(logits.shape[0])  # (B,), drawn for every row so rows never shift the stream
        return np.array([self._sample_row(row, ui) for row, ui in zip(logits, u)], dtype=np.int64)

    def _sample_row(self, row: np.ndarray, u: float) -> int:
        p = self.params
        x = row.astype(np.float64) / p.temperature  # (V,)
        V = x.shape[0]
        k = p.top_k if 0 < p.top_k < V else V
        if k < V:
            cand = np.argpartition(-x, k - 1)[:k]  # (k,) unordered
        else:
            cand = None
        if p.top_p < 1.0:
            cand = _nucleus(x, cand, p.top_p)  # (n,) most likely first
        if cand is None:
            probs = np.exp(x - x.max())  # (V,)
            cdf = np.cumsum(probs)
            return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), V - 1))
        probs = np.exp(x[cand] - x[cand].max())  # (n,)
        cdf = np.cumsum(probs)
        return int(cand[min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cand) - 1)])


def penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL repetition penalty, as transformers applies it: seen logits > 0 are divided by the
    penalty, the others multiplied, so a penalty > 1 always makes a seen token less likely."""
    scaled = np.where(logits > 0, logits / penalty, logits * penalty)  # (B, V)
    return np.where(seen, scaled, logits).astype(np.float32, copy=False)


def _nucleus(x: np.ndarray, cand: np.ndarray | None, top_p: float) -> np.ndarray:
    """Candidates (most likely first) whose probability mass first reaches top_p, the crossing
    token included and at least one kept (transformers' TopPLogitsWarper)."""
    pool = np.arange(x.shape[0]) if cand is None else cand
    logz = _logsumexp(x[pool])  # normalise over the top-k survivors (top-k is applied first)
    if len(pool) > _NUCLEUS_PREFILTER:
        head = pool[np.argpartition(-x[pool], _NUCLEUS_PREFILTER - 1)[:_NUCLEUS_PREFILTER]]
        if np.exp(x[head] - logz).sum() >= top_p:  # the nucleus lies inside the head: exact
            pool = head
    order = pool[np.argsort(-x[pool], kind="stable")]  # (n,) most likely first
    mass = np.cumsum(np.exp(x[order] - logz))
    n = int(np.searchsorted(mass, top_p, side="left")) + 1
    return order[: min(n, len(order))]


def _logsumexp(x: np.ndarray) -> float:
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))
