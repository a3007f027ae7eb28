"""The decode loop of one request: prefill, then sample every row, stop rows on their own, hand
out final text, time each row and keep the attention it ran with. numpy only.

Rows that finish are frozen (fed padding, their text no longer changes) while the others go on.
Shapes: B batch, V tokenizer vocabulary, nh heads.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from gptdeploy.options import Request
from gptdeploy.results import GenerationResult, assemble_attention, timings
from gptdeploy.runtimes.base import RuntimeBase
from gptdeploy.sampling import Sampler
from gptdeploy.steps import Steps
from gptdeploy.textstate import RowText
from gptdeploy.tokenizer import Tokenizer


def run(runtime: RuntimeBase, tokenizer: Tokenizer, req: Request) -> Iterator[tuple[int, str]]:
    """Yields (row, text piece) as text becomes final; returns the list of GenerationResult."""
    V, B, N = tokenizer.vocab_size, len(req.prompts), req.max_new_tokens
    steps = Steps(runtime, req.prompts, tokenizer.pad_token_id, room=N)
    seen = _seen(req, V)
    sampler = Sampler(req.sampling)
    rows = [RowText(tokenizer, req.stops, p, req.stream) for p in req.prompts]
    finished = np.zeros(B, dtype=bool)  # (B,)
    n_finished = 0  # a Python count: numpy reductions on tiny arrays cost ~4 us each, per token
    t_done = [0.0] * B
    attention: list[list[np.ndarray]] = []  # per step, per layer (B, nh, T, S)

    t0 = time.perf_counter()
    out = steps.prefill(req.record_attention)
    t_first = t0
    for step in range(N):
        if req.record_attention:
            attention.append(out.attentions)
        chosen = sampler(out.logits[:, :V], seen)  # (B,), padding columns never sampled
        if step == 0:
            t_first = time.perf_counter()
        last = step == N - 1
        for b, row in enumerate(rows):
            if row.finished:
                continue
            if piece := row.push(int(chosen[b]), last):
                yield b, piece
            if row.finished:
                finished[b], t_done[b] = True, time.perf_counter()
                n_finished += 1
        if last or n_finished == B:
            break
        if seen is not None:
            seen[np.arange(B), chosen] = True
        if n_finished:
            chosen = np.where(finished, tokenizer.pad_token_id, chosen)  # frozen rows feed padding
        out = steps.decode(chosen, req.record_attention)
    t_end = time.perf_counter()
    return [
        GenerationResult(
            row.text, row.token_ids, list(req.prompts[b]), row.finish_reason,
            timings(len(row.token_ids), t0, t_first, t_done[b] or t_end, t_end), req.sampling,
            assemble_attention(attention, b, int(steps.pads[b]), int(steps.lengths[b]), len(row.token_ids))
            if req.record_attention else None,
        )
        for b, row in enumerate(rows)
    ]


def _seen(req: Request, V: int) -> np.ndarray | None:
    """(B, V) the ids already in each row, for the repetition penalty; None when it is off."""
    if req.sampling.repetition_penalty == 1.0:
        return None
    seen = np.zeros((len(req.prompts), V), dtype=bool)
    for b, p in enumerate(req.prompts):
        seen[b, [i for i in p if i < V]] = True
    return seen
