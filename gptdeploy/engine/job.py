"""One prompt's generation inside the engine, as data: its options, its own random stream, stop
rules and text state, its place in the KV cache, timings and the attention it ran with. numpy only.

A job's next token depends only on its own logits row and its own sampler, so it samples the
same alone or among others. The row itself is equal only to float32 rounding: the batch's
padded cache width changes the order of sums (measured: logits within 3e-7, attention within
1.3e-7 of a run alone). Shapes: V tokenizer vocabulary, nh heads, P cache positions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from gptdeploy.engine.ticket import Ticket
from gptdeploy.errors import GptDeployError, RequestAborted
from gptdeploy.options import Request
from gptdeploy.results import GenerationResult, assemble_attention, timings
from gptdeploy.sampling import Sampler, SamplingParams
from gptdeploy.textstate import RowText
from gptdeploy.tokenizer import Tokenizer


class Job:
    """What the engine keeps of one request between steps."""

    def __init__(
        self,
        ticket: Ticket,
        prompt: list[int],
        req: Request,
        sampling: SamplingParams,
        tokenizer: Tokenizer,
        deadline: float | None,
    ):
        self.ticket = ticket
        self.prompt = prompt
        self.max_new_tokens = req.max_new_tokens
        self.sampling = sampling  # this row's own: see options.row_sampling
        self.record_attention = req.record_attention
        self.deadline = deadline  # time.perf_counter() after which the request times out
        self.sampler = Sampler(sampling)  # this request's own random stream
        self.text = RowText(tokenizer, req.stops, prompt, req.stream)
        self._V = tokenizer.vocab_size
        self.seen = _seen(prompt, self._V) if sampling.repetition_penalty != 1.0 else None  # (V,)
        self.length = len(prompt)  # positions this job holds in the KV cache
        self.last = -1  # the token to feed at the next decode step
        self.t_submit = ticket.t_submit
        self.token_times: list[float] = []
        self.attention: list[list[np.ndarray]] = []  # per step, per layer; see results.assemble_attention
        self.done = False  # finished or failed: its row is free (fed padding until the engine drops it)

    def ended_early(self, now: float, shutting_down: bool) -> RequestAborted | None:
        """Why this job must stop now (cancelled, timed out, shutdown), or None."""
        if self.ticket.cancelled:
            return RequestAborted(f"request {self.ticket.id} was cancelled", "cancelled")
        if self.deadline is not None and now > self.deadline:
            return RequestAborted(
                f"request {self.ticket.id} timed out after {self.deadline - self.t_submit:.1f} s", "timeout"
            )
        if shutting_down:
            return RequestAborted(
                f"request {self.ticket.id} was stopped: the server is shutting down", "shutdown"
            )
        return None

    def advance(self, logits: np.ndarray) -> bool:
        """Choose the next token from this job's logits row (V_model,); True when the job is done."""
        seen = None if self.seen is None else self.seen[None]  # (1, V)
        token = int(self.sampler(logits[None, : self._V], seen)[0])  # padding columns never sampled
        self.token_times.append(time.perf_counter())
        last = len(self.text.token_ids) + 1 == self.max_new_tokens
        if piece := self.text.push(token, last):
            self.ticket._piece(piece)
        if self.seen is not None:
            self.seen[token] = True
        self.last = token
        return self.text.finished

    def keep_prefill(self, attentions: list[np.ndarray], row: int, pad: int) -> None:
        """This job's block of a prefill's per-layer (B, nh, L, L) attention, padding stripped."""
        self.attention.append([np.ascontiguousarray(a[row : row + 1, :, pad:, pad:]) for a in attentions])

    def keep_step(self, attentions: list[np.ndarray], row: int) -> None:
        """This job's row of a decode step's per-layer (B, nh, 1, P+1) attention: its own positions."""
        n = self.length  # after the step: the positions it holds, the token just fed included
        self.attention.append(
            [np.ascontiguousarray(a[row : row + 1, :, :, a.shape[-1] - n :]) for a in attentions]
        )

    def finish(self) -> None:
        self.done = True
        self.ticket._end(result=self.result(), token_times=self.token_times)

    def fail(self, error: GptDeployError) -> None:
        self.done = True
        self.ticket._end(error=error, token_times=self.token_times)

    def result(self) -> GenerationResult:
        n, t = len(self.text.token_ids), self.token_times
        t_first, t_end = (t[0], t[-1]) if t else (self.t_submit, self.t_submit)
        attention = (
            assemble_attention(self.attention, 0, 0, len(self.prompt), n) if self.record_attention else None
        )
        return GenerationResult(
            self.text.text,
            self.text.token_ids,
            list(self.prompt),
            self.text.finish_reason,
            timings(n, self.t_submit, t_first, t_end, t_end),
            self.sampling,
            attention,
        )


def _seen(prompt: Sequence[int], V: int) -> np.ndarray:
    """(V,) the ids already in the row, for the repetition penalty."""
    seen = np.zeros(V, dtype=bool)
    seen[[i for i in prompt if i < V]] = True
    return seen
