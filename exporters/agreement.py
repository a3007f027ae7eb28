"""A quantized graph against the fp32 graph it was made from: the measures that mean something.

Max |logit diff| says little once weights are int8 or int4; what a user needs to know is
whether the model still says the same things and still predicts text as well:

- greedy agreement: both graphs generate 32 greedy tokens from each prompt, each driven by
  its own choices; per prompt, the number of leading tokens that agree. At the first
  divergence both graphs saw the same context, so the fp32 graph's own logits tell how
  close the call was: the margin (in nats) by which it preferred its token over the one the
  quantized graph chose;
- top-1 agreement: on held-out text, fed token by token through the KV cache (the path
  generation takes), the share of positions where both graphs predict the same next token,
  and where they do not, again the fp32 graph's margin between the two tokens;
- perplexity of both graphs on that text, and its relative increase.

The bounds (parity.TOLERANCES) are on perplexity and on those margins: a quantized graph may
choose differently only where the fp32 graph itself nearly tied. The agreement rates are
reported, not bounded: on a random-init model nearly every position is a near-tie (top-1
agreement 60% for int4 on a random 124M, measured) and a rate says nothing about damage.
Both graphs run in lockstep on identical inputs, so no logits are kept beyond one step.
Shapes: B batch (windows or prompts), L window length, V vocab.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from gptdeploy.contract import GraphSignature
from gptdeploy.parity import TOLERANCES
from gptdeploy.runtimes.session import SessionRuntime
from gptdeploy.steps import Steps


@dataclass(frozen=True)
class EvalText:
    """Token windows the tokenizer covers, and where they came from (goes in the report)."""

    kind: str  # "held-out text" or "sampled from the fp32 graph (fallback)"
    description: str
    windows: list[list[int]]  # (W, L) token ids
    path: str | None = None  # the text file, when there is one (verify re-reads it)
    sha256: str | None = None

    def summary(self) -> dict:
        return {"kind": self.kind, "description": self.description, "path": self.path, "sha256": self.sha256,
                "windows": len(self.windows),
                "window_tokens": len(self.windows[0]) if self.windows else 0,
                "scored_tokens": sum(len(w) - 1 for w in self.windows)}


@dataclass
class Measure:
    """One measure and its upper bound (every measure here is "lower is better")."""

    name: str
    value: float
    bound: float
    reason: str

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.value)) and self.value <= self.bound


@dataclass
class AgreementReport:
    """Quantized graph vs the fp32 graph (gptdeploy.evidence.Evidence, as parity.ParityReport)."""

    reference: str
    precision: str
    eval_text: dict
    measures: list[Measure] = field(default_factory=list)
    greedy_steps: int = 0
    greedy_prefix: list[int] = field(default_factory=list)  # per prompt: leading tokens that agree
    divergence_margins: list[float] = field(default_factory=list)  # fp32 margin (nats) at each first divergence
    graph_tokens: list[list[int]] = field(default_factory=list)
    reference_tokens: list[list[int]] = field(default_factory=list)
    perplexity_fp32: float = 0.0
    perplexity: float = 0.0
    top1_agreement: float = 0.0
    top1_margins: dict[str, float] = field(default_factory=dict)  # percentiles of the fp32 margin where top-1 differs
    seconds: float = 0.0

    @property
    def greedy_agree(self) -> int:
        """Leading steps on which every prompt agrees (ParityReport's meaning)."""
        return min(self.greedy_prefix) if self.greedy_prefix else 0

    @property
    def failures(self) -> list[Measure]:
        return [m for m in self.measures if not m.passed]

    @property
    def greedy_ok(self) -> bool:
        return all(m.passed for m in self.measures if m.name.startswith("greedy"))

    @property
    def passed(self) -> bool:
        return not self.failures

    def worst(self, prefix: str) -> float:
        return max((m.value for m in self.measures if m.name.startswith(prefix)), default=0.0)

    def summary(self) -> dict[str, dict]:
        return {m.name: {"max_abs_diff": m.value, "tolerance": m.bound} for m in self.measures}

    def describe_failures(self) -> str:
        return "; ".join(f"{m.name} {m.value:.4g} > bound {m.bound:.4g} ({m.reason})" for m in self.failures)

    def describe(self) -> str:
        agree = sum(self.greedy_prefix)
        total = self.greedy_steps * len(self.greedy_prefix)
        return (f"perplexity {self.perplexity:.3f} vs fp32 {self.perplexity_fp32:.3f} "
                f"({100 * (self.perplexity / self.perplexity_fp32 - 1):+.2f}%), top-1 agreement "
                f"{100 * self.top1_agreement:.1f}%, greedy tokens agree {agree}/{total}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["measures"] = [asdict(m) | {"passed": m.passed} for m in self.measures]
        d["passed"] = self.passed
        d["greedy_agree"] = self.greedy_agree
        d["summary"] = self.summary()
        return d


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_greedy(ref, ref_sig, graph, sig, prompts, *, steps: int, pad_id: int, vocab: int):
    """Both graphs generate `steps` greedy tokens per prompt (left-padded batch), each on its own chain."""
    B = len(prompts)
    chains = [Steps(SessionRuntime(session, s), prompts, pad_id, room=steps) for session, s in ((ref, ref_sig), (graph, sig))]
    outs = [c.prefill() for c in chains]
    tokens: list[list[list[int]]] = [[[] for _ in range(B)], [[] for _ in range(B)]]
    prefix = [steps] * B
    margins: list[float] = []
    for step in range(steps):
        logits = [o.logits[:, :vocab] for o in outs]  # (B, V) each
        nxt = [lg.argmax(-1) for lg in logits]  # (B,) each
        for c in range(2):
            for r in range(B):
                tokens[c][r].append(int(nxt[c][r]))
        for r in range(B):
            if prefix[r] == steps and nxt[0][r] != nxt[1][r]:
                prefix[r] = step  # same context so far: the fp32 logits judge how close the call was
                lp = log_softmax(logits[0][r])
                margins.append(float(lp[nxt[0][r]] - lp[nxt[1][r]]))
        if step < steps - 1:
            outs = [c.decode(n) for c, n in zip(chains, nxt)]
    return tokens[0], tokens[1], prefix, margins


def compare_teacher_forced(ref, ref_sig, graph, sig, windows: list[list[int]], *, vocab: int):
    """Feed each window token by token (batched) through both graphs. Returns the fp32 and the
    quantized mean NLL, the top-1 agreement rate, and at every disagreeing position the fp32
    graph's margin (nats) between its top token and the quantized graph's."""
    win = np.asarray(windows, dtype=np.int64)  # (W, L)
    W, L = win.shape
    chains = [Steps(SessionRuntime(session, s), win[:, :1].tolist(), 0, room=L) for session, s in ((ref, ref_sig), (graph, sig))]
    outs = [c.prefill() for c in chains]
    nll = np.zeros(2)
    agree, count = 0, 0
    margins: list[float] = []
    for t in range(L - 1):  # outs predict token t + 1
        lps = [log_softmax(o.logits[:, :vocab]) for o in outs]  # (W, V) each
        for c in range(2):
            nll[c] -= lps[c][np.arange(W), win[:, t + 1]].sum()
        top_ref, top = lps[0].argmax(-1), lps[1].argmax(-1)  # (W,)
        rows = np.flatnonzero(top_ref != top)
        margins += (lps[0][rows, top_ref[rows]] - lps[0][rows, top[rows]]).tolist()
        agree += W - len(rows)
        count += W
        if t < L - 2:
            outs = [c.decode(win[:, t + 1]) for c in chains]
    return nll[0] / count, nll[1] / count, agree / count, margins


def check_agreement(
    ref, ref_sig: GraphSignature, graph, sig: GraphSignature, *, precision: str, prompts: list[list[int]],
    eval_text: EvalText, pad_id: int, vocab: int, greedy_steps: int,
) -> AgreementReport:
    """Measure `graph` (quantized) against `ref` (the fp32 graph) and judge by TOLERANCES[precision]."""
    t0 = time.perf_counter()
    bounds = TOLERANCES[precision]
    report = AgreementReport("fp32 graph (onnxruntime CPU)", precision, eval_text.summary(), greedy_steps=greedy_steps)
    ref_tokens, tokens, prefix, margins = compare_greedy(
        ref, ref_sig, graph, sig, prompts, steps=greedy_steps, pad_id=pad_id, vocab=vocab
    )
    report.reference_tokens, report.graph_tokens = ref_tokens, tokens
    report.greedy_prefix, report.divergence_margins = prefix, margins
    nll_ref, nll, top1, top1_margins = compare_teacher_forced(ref, ref_sig, graph, sig, eval_text.windows, vocab=vocab)
    report.top1_margins = _percentiles(top1_margins)
    report.perplexity_fp32, report.perplexity = float(np.exp(nll_ref)), float(np.exp(nll))
    report.top1_agreement = float(top1)
    increase = report.perplexity / report.perplexity_fp32 - 1
    margin, why = bounds["margin"]
    report.measures += [
        Measure("perplexity increase", increase, *bounds["perplexity"]),
        Measure("greedy divergence margin (nats)", max(margins, default=0.0), margin, why),
        Measure("top-1 disagreement margin p99 (nats)", report.top1_margins.get("p99", 0.0), margin, why),
    ]
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"count": len(values), "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(max(values))}


__all__ = ["AgreementReport", "EvalText", "Measure", "check_agreement", "compare_greedy", "compare_teacher_forced"]
