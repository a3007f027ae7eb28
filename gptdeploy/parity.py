"""Parity: an exported graph, run with onnxruntime, against the source framework's own forward.

One chain of greedy steps drives both sides: a batched, left-padded prefill, then decode
steps fed from the graph's own KV cache. At the prefill and the first `DETAILED_STEPS`
decode steps every output is compared (logits, every present, every attention); at every
step the reference's argmax is compared with the graph's, which is the same as comparing
the two greedy chains token for token. Every mismatch is collected, then reported once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from gptdeploy import contract as io
from gptdeploy.contract import GraphSignature
from gptdeploy.runtimes.session import SessionRuntime
from gptdeploy.steps import Steps, positions

DETAILED_STEPS = 8
GREEDY_STEPS = 32

# The one table of parity bounds, per graph precision, each with its reason; the measurements
# behind each bound are in the README ("Parity tolerances", "Parity bounds per precision"), not here.
# fp32, fp16: max |diff| against the fp32 source framework per output kind; entries named in
# RELATIVE are fractions of max |reference| at that phase. "greedy": the largest reference
# margin (nats) at which a greedy step may choose another token (fp32: none may).
# int8, int4: measures of the quantized graph against the fp32 graph (exporters/agreement.py).
TOLERANCES: dict[str, dict[str, tuple[float, str]]] = {
    "fp32": {
        "logits": (1e-4, "the same fp32 math in another GEMM order"),
        "present": (1e-4, "K/V are one norm + GEMM deep: fp32 rounding"),
        "attention": (1e-5, "probabilities in [0, 1]; fp32 softmax of near-equal inputs"),
    },
    "fp16": {
        "logits": (1e-2, "relative: fp16 rounds at 2^-11 per op; measured worst ~6x below"),
        "present": (1e-2, "relative: K/V stored in fp16 after one fp16 GEMM; measured worst ~5x below"),
        "attention": (1e-2, "fp32 softmax of scores from fp16 q and k; measured worst ~6x below"),
        "greedy": (0.1, "a token may differ only at a near-tie of the reference"),
    },
    "int8": {
        "perplexity": (0.03, "int8 perplexity within +3% of the fp32 graph on held-out text"),
        "margin": (0.5, "int8 may pick another token only where the fp32 graph had both within 0.5 nats"),
    },
    "int4": {
        "perplexity": (0.10, "int4 perplexity within +10% of the fp32 graph on held-out text"),
        "margin": (1.5, "int4 may pick another token only where the fp32 graph had both within 1.5 nats"),
    },
}
RELATIVE: dict[str, set[str]] = {"fp16": {"logits", "present"}}


@dataclass
class Check:
    output: str  # "logits", "present.3.key", "attentions.0", ...
    phase: str  # "prefill" or "decode 1" .. "decode 8"
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance


@dataclass
class ParityReport:
    reference: str
    precision: str
    batch: int
    prompt_lengths: list[int]
    checks: list[Check] = field(default_factory=list)
    greedy_steps: int = 0
    greedy_agree: int = 0  # leading steps where reference and graph chose the same token
    # Steps where they differ: (step, row, reference margin in nats between the two tokens).
    greedy_mismatches: list[tuple[int, int, float]] = field(default_factory=list)
    greedy_margin: float = 0.0  # the largest margin a mismatch may have (TOLERANCES "greedy"; fp32: 0)
    graph_tokens: list[list[int]] = field(default_factory=list)
    reference_tokens: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0
    runtime: str = "onnxruntime CPUExecutionProvider"  # what ran the graph (fp16: a CPU path that computes in fp16)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def greedy_ok(self) -> bool:
        """Every step agrees, or (where the table allows it) differs only at a near-tie of the reference."""
        if self.greedy_margin <= 0:
            return self.greedy_agree == self.greedy_steps
        return all(margin <= self.greedy_margin for _, _, margin in self.greedy_mismatches)

    @property
    def passed(self) -> bool:
        return not self.failures and self.greedy_ok

    def worst(self, prefix: str) -> float:
        diffs = [c.max_abs_diff for c in self.checks if c.output.startswith(prefix)]
        return max(diffs) if diffs else 0.0

    def summary(self) -> dict[str, dict]:
        """Per output kind: the check closest to (or furthest past) its tolerance, over all phases."""
        out = {}
        for kind in ("logits", "present", "attentions"):
            cs = [c for c in self.checks if c.output.startswith(kind)]
            if cs:
                worst = max(cs, key=lambda c: (c.max_abs_diff / c.tolerance if c.tolerance > 0 else np.inf, c.max_abs_diff))
                out[kind] = {"max_abs_diff": worst.max_abs_diff, "tolerance": worst.tolerance}
        return out

    def describe(self) -> str:
        return (f"parity vs {self.reference}: max |logit diff| {self.worst('logits'):.1e}, "
                f"greedy tokens agree {self.greedy_agree}/{self.greedy_steps}")

    def describe_failures(self) -> str:
        parts = [f"{c.output} at {c.phase}: {c.max_abs_diff:.2e} > {c.tolerance:.0e}" for c in self.failures[:6]]
        if len(self.failures) > 6:
            parts.append(f"... {len(self.failures) - 6} more")
        if not self.greedy_ok:
            parts.append(f"greedy tokens agree for {self.greedy_agree} of {self.greedy_steps} steps")
            worst = max((m for _, _, m in self.greedy_mismatches), default=0.0)
            if self.greedy_margin > 0:
                parts.append(f"a mismatch at reference margin {worst:.3f} > {self.greedy_margin} nats")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checks"] = [asdict(c) | {"passed": c.passed} for c in self.checks]
        d["passed"] = self.passed
        d["summary"] = self.summary()
        return d


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.max()) if d.size else 0.0


def _tolerance(precision: str, kind: str, reference: np.ndarray) -> float:
    """The absolute tolerance for one check: the table's value, scaled by max |reference| where relative."""
    value = TOLERANCES[precision][kind][0]
    if kind in RELATIVE.get(precision, ()):
        value *= float(np.abs(reference).max()) if reference.size else 0.0
    return value


def check_parity(
    session,
    sig: GraphSignature,
    reference,
    prompts: list[list[int]],
    *,
    precision: str = "fp32",
    pad_id: int = 0,
    greedy_steps: int = GREEDY_STEPS,
    detailed_steps: int = DETAILED_STEPS,
    vocab_limit: int | None = None,
) -> ParityReport:
    """Compare `session` (an onnxruntime InferenceSession over a contract graph, or the fp16 CPU
    path) with `reference` (exporters.sources.base.Reference) on `prompts`, left-padded into one batch."""
    t0 = time.perf_counter()
    report = ParityReport(reference.name, precision, len(prompts), [len(p) for p in prompts], greedy_steps=greedy_steps)
    report.greedy_margin = TOLERANCES[precision].get("greedy", (0.0, ""))[0]
    report.runtime = getattr(session, "path_description", report.runtime)
    report.graph_tokens = [[] for _ in prompts]
    report.reference_tokens = [[] for _ in prompts]
    vocab = vocab_limit or sig.vocab_size
    steps = Steps(SessionRuntime(session, sig, precision), prompts, pad_id, room=greedy_steps)
    out = steps.prefill()
    for step in range(greedy_steps + 1):
        T = 1 if step else steps.size  # positions this step fed
        ref = _reference_forward(reference, steps)
        ref_logits = ref.logits[:, -T:, :].float().numpy()  # (B, T, V)
        if step <= detailed_steps:
            _compare_step(report, "prefill" if step == 0 else f"decode {step}", out.outputs, ref, ref_logits, sig, steps)
        if step == greedy_steps:
            break
        nxt = out.logits[:, :vocab].argmax(-1)  # (B,) the graph's greedy choice drives the chain
        _record_greedy(report, step, nxt, ref_logits[:, -1, :vocab])
        out = steps.decode(nxt)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _reference_forward(reference, steps: Steps):
    """The source framework's full-sequence forward over every position fed so far (no KV cache)."""
    import torch  # export-time only: the reference forward is a torch model

    ids, mask = torch.from_numpy(steps.ids.copy()), torch.from_numpy(steps.mask.copy())
    with torch.no_grad():
        return reference(ids, mask, torch.from_numpy(positions(steps.mask)))


def _compare_step(report: ParityReport, phase: str, outs: dict, ref, ref_logits, sig: GraphSignature, steps: Steps):
    """Every output of one step against the reference. Pad positions are left out: a pad query
    row is fully masked, so its hidden state (and the next layer's K/V there) is arbitrary and never read."""
    precision = report.precision
    real = steps.mask.astype(bool)  # (B, S) real positions
    T = ref_logits.shape[1]
    rows = real[:, -T:]  # (B, T) real query rows of this step
    graph_logits = outs[io.LOGITS]
    if sig.last_logits_only:
        ref_logits, rows = ref_logits[:, -1:, :], rows[:, -1:]  # the graph returns the last row only
    want = ref_logits[rows]
    report.checks.append(Check(io.LOGITS, phase, _max_diff(graph_logits[rows], want), _tolerance(precision, "logits", want)))
    for i in range(sig.n_layer):
        for name, ref_t in ((io.present_key(i), ref.keys[i]), (io.present_value(i), ref.values[i])):
            have = outs[name].transpose(0, 2, 1, 3)[real]  # (real positions, nkv, hs)
            want = ref_t.float().numpy().transpose(0, 2, 1, 3)[real]
            report.checks.append(Check(name, phase, _max_diff(have, want), _tolerance(precision, "present", want)))
        if sig.attentions:
            ref_att = ref.attentions[i][:, :, -T:, :].float().numpy()  # (B, nh, T, S)
            d = _max_diff(outs[io.attention(i)].transpose(0, 2, 1, 3)[real[:, -T:]], ref_att.transpose(0, 2, 1, 3)[real[:, -T:]])
            report.checks.append(Check(io.attention(i), phase, d, TOLERANCES[precision]["attention"][0]))


def _record_greedy(report: ParityReport, step: int, nxt: np.ndarray, ref_last: np.ndarray) -> None:
    """Both chains' choices at `step`; a mismatch keeps the reference's margin (nats) between them."""
    ref_nxt = ref_last.argmax(-1)  # (B,)
    for r in range(len(nxt)):
        report.graph_tokens[r].append(int(nxt[r]))
        report.reference_tokens[r].append(int(ref_nxt[r]))
    if report.greedy_agree == step and (nxt == ref_nxt).all():
        report.greedy_agree += 1
    for r in np.flatnonzero(nxt != ref_nxt):
        lp = ref_last[r].astype(np.float64)
        lp = lp - lp.max() - np.log(np.exp(lp - lp.max()).sum())  # log-softmax
        report.greedy_mismatches.append((step, int(r), float(lp[ref_nxt[r]] - lp[nxt[r]])))
