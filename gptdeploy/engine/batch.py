"""The runtime's batch, row by row: what one round of the engine's loop does to it (rows ending,
joiners prefilling into free rows, one decode step for every row). Owned by the engine's thread;
numpy only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from gptdeploy.engine.job import Job
from gptdeploy.engine.layout import gather, step_inputs
from gptdeploy.errors import GptDeployError, RuntimeFailure
from gptdeploy.runtimes.base import RuntimeBase
from gptdeploy.steps import left_pad, positions

log = logging.getLogger(__name__)


class Batch:
    """The jobs in the runtime's batch; a done job's row is free until the next relayout."""

    def __init__(self, runtime: RuntimeBase, pad_id: int, on_step: Callable[[int, float], None] | None):
        self.runtime, self.pad_id = runtime, pad_id
        self.rows: list[Job] = []
        self.moves_cache = runtime.can_move_cache
        self._on_step = on_step  # (batch size, seconds) after every decode step: for metrics

    def active(self) -> int:
        return sum(not job.done for job in self.rows)

    def free_rows(self, max_batch: int) -> int:
        """Rows that waiting jobs can take at the next round. A runtime that cannot move its cache
        (can_move_cache) takes joiners only once its whole batch is done."""
        active = self.active()
        return max_batch - active if self.moves_cache or not active else 0

    def round(self, joiners: list[Job], now: float, aborting: bool) -> None:
        """Rows that ended leave, joiners take rows, then one decode step for every row."""
        for job in self.rows:
            if not job.done and (why := job.ended_early(now, aborting)):
                job.fail(why)  # its row is free now: reused or dropped below, before any step
        done = [job.done for job in self.rows]
        if (joiners or any(done)) if self.moves_cache else (all(done) and (joiners or done)):
            self._relayout(joiners)
        if self.rows:
            self._decode()

    def fail(self, error: RuntimeFailure, joiners: list[Job] = ()) -> None:
        """Fail every job in the batch (and `joiners`) and start the runtime over empty."""
        for job in [*joiners, *self.rows]:
            if not job.done:
                job.fail(error)
        self.rows = []
        self.runtime.reset()

    def _relayout(self, joiners: list[Job]) -> None:
        """Joiners prefill and take free rows (or new ones); free rows nobody took are dropped."""
        stay = [(r, job) for r, job in enumerate(self.rows) if not job.done]
        main = self.runtime.take_cache() if stay else None
        placed = self._prefill(joiners) if joiners else {}  # {prefill row: job}
        if self.moves_cache:  # else a job done at its first token keeps its row, fed padding
            placed = {j: job for j, job in placed.items() if not job.done}
        rows: list[Job | None] = [None if job.done else job for job in self.rows]
        for job in placed.values():
            free = rows.index(None) if None in rows else len(rows)
            rows[free : free + 1] = [job]
        self.rows = [job for job in rows if job is not None]
        if all(job.done for job in self.rows):
            self.rows = []
            self.runtime.reset()
        elif stay or len(placed) < len(joiners):  # else the joiners' prefill cache is the batch as is
            sources = [main or [], self.runtime.take_cache() if placed else []]
            where = {id(job): (0, r) for r, job in stay} | {id(job): (1, j) for j, job in placed.items()}
            self.runtime.put_cache(gather(sources, [(*where[id(job)], job.length) for job in self.rows]))

    def _prefill(self, joiners: list[Job]) -> dict[int, Job]:
        """Run the joiners' prompts as one left-padded batch; each samples its first token."""
        ids, mask = left_pad([job.prompt for job in joiners], self.pad_id)  # (J, L)
        record = any(job.record_attention for job in joiners)
        out = self.runtime.prefill(ids, mask, positions(mask), record)
        for j, job in enumerate(joiners):
            if job.record_attention:
                job.keep_prefill(out.attentions, j, ids.shape[1] - len(job.prompt))
            self._advance(job, out.logits[j])
        return dict(enumerate(joiners))

    def _decode(self) -> None:
        """One step for every row; rows whose job is done are fed padding."""
        rows = self.rows
        t0 = time.perf_counter()
        lengths = np.array([job.length for job in rows])  # (B,)
        mask, pos = step_inputs(lengths, self.runtime.past_length)  # (B, P+1), (B, 1)
        ids = np.array([[self.pad_id if job.done else job.last] for job in rows], dtype=np.int64)  # (B, 1)
        record = any(job.record_attention and not job.done for job in rows)
        active = self.active()  # the requests this step advances
        out = self.runtime.decode(ids, mask, pos, record)
        for r, job in enumerate(rows):
            job.length += 1
            if job.done:
                continue
            if job.record_attention:
                job.keep_step(out.attentions, r)
            self._advance(job, out.logits[r])
        if self._on_step is not None:
            self._on_step(active, time.perf_counter() - t0)

    def _advance(self, job: Job, logits: np.ndarray) -> None:
        """The job's next token; a failure of its own (NaN logits: the model's fault, not the
        request's) ends only this job."""
        try:
            finished = job.advance(logits)
        except GptDeployError as exc:
            log.error("request %s failed: %s", job.ticket.id, exc)
            job.fail(as_failure(exc, self.runtime.name))
            return
        if finished:
            job.finish()


def as_failure(exc: Exception, runtime: str) -> RuntimeFailure:
    """What a caller is told when a step raised `exc`: never their fault."""
    if isinstance(exc, RuntimeFailure):
        return exc
    if isinstance(exc, GptDeployError):  # a runtime's own check (a CUDA call, a shape): its message
        return RuntimeFailure(" ".join(str(exc).split()))
    return RuntimeFailure(f"the engine failed running a step on the {runtime} runtime ({describe(exc)})")


def describe(exc: BaseException) -> str:
    """`Type: message`, on one line and short: for one-line errors."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


__all__ = ["Batch", "as_failure", "describe"]
