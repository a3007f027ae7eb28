"""The batching engine: one thread owns the runtime and its KV cache and advances every active
request one token per decode step (continuous batching, as llama.cpp's server slots and vLLM's
scheduler do). numpy only: never imports torch.

Each round of the loop:
  1. requests that were cancelled or timed out leave their row;
  2. waiting requests join, as many as there are free rows: their prompts run as one small
     left-padded prefill of their own, each samples its first token, and their cache rows are
     merged with the rows that stay (runtime.take_cache / put_cache; layout.gather);
  3. one decode step for every row: each request samples from its own logits row with its own
     random stream, pushes its text, and finished requests free their row.
Rows freed in 3 are reused by the next joiners in 2, or dropped there when no one waits, so the
cache grows and shrinks with the batch; between these events a step allocates no cache.

Faults: a step that raises fails the requests in it (RuntimeFailure: the machine's fault, not the
caller's) and the runtime starts over empty; if even that fails, the engine fails every request
it holds, takes no more (`failure` says why; a server reports itself unhealthy) and its thread ends.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gptdeploy.bundle import Bundle
from gptdeploy.engine.job import Job
from gptdeploy.engine.layout import gather, step_inputs
from gptdeploy.engine.ticket import Ticket
from gptdeploy.errors import (
    ContextOverflowError,
    GenerationError,
    GptDeployError,
    QueueFullError,
    RequestAborted,
    RuntimeFailure,
)
from gptdeploy.options import (
    GenerationOptions,
    Request,
    build_request,
    check_ids,
    encode,
    row_sampling,
    takes_options,
)
from gptdeploy.runtimes.backends import open_runtime
from gptdeploy.runtimes.base import RuntimeBase
from gptdeploy.steps import left_pad, positions
from gptdeploy.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    max_batch: int = 16  # rows decoded together; more requests wait for a free row
    # Requests that may wait beyond the rows free for them; one more and submit raises
    # QueueFullError. 0: only what can start at the next step; None: no bound.
    max_queue: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise GenerationError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")
        if self.max_queue is not None and (not isinstance(self.max_queue, int) or self.max_queue < 0):
            raise GenerationError(f"max_queue must be an integer >= 0 or None, got {self.max_queue!r}")


class Engine:
    """Requests from any thread, batched on one runtime. Owns the runtime: close() or `with`."""

    def __init__(
        self,
        runtime: RuntimeBase,
        tokenizer: Tokenizer,
        bundle: Bundle,
        limits: EngineLimits = EngineLimits(),
        on_step: Callable[[int, float], None] | None = None,
    ):
        self.runtime, self.tokenizer, self.bundle = runtime, tokenizer, bundle
        # A runtime may bound the batch too (a TensorRT engine's profiles).
        self.max_batch = limits.max_batch if runtime.max_batch is None else min(limits.max_batch, runtime.max_batch)
        self.max_queue = limits.max_queue
        self._on_step = on_step  # (batch size, seconds) after every decode step: for metrics
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._rows: list[Job] = []  # the runtime's batch, row by row (a done job's row is free)
        self._moves_cache = runtime.can_move_cache
        self._accepting, self._stopping, self._aborting = True, False, False
        self._abort_at: float | None = None  # perf_counter() at which requests in flight are ended
        self._failure: RuntimeFailure | None = None  # set when the loop could not recover: see failure
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()

    @classmethod
    def load(
        cls,
        bundle_dir: str | os.PathLike,
        backend: str = "auto",
        graph: str | None = None,
        threads: int | None = None,
        verify_hashes: bool = True,
        limits: EngineLimits = EngineLimits(),
        on_step: Callable[[int, float], None] | None = None,
    ) -> Engine:
        """Load and check a bundle, open `backend` on it ("auto": the best one available)."""
        bundle = Bundle.load(bundle_dir, verify_hashes=verify_hashes)
        tokenizer = Tokenizer.from_bundle(bundle)
        return cls(open_runtime(bundle, backend, graph, threads), tokenizer, bundle, limits, on_step)

    @property
    def max_context(self) -> int:
        """Positions a request may use: the model's context, or the runtime's own limit where that
        is smaller (a TensorRT engine built with a smaller --max-context)."""
        model, runtime = self.bundle.manifest.max_context, self.runtime.max_context
        return model if runtime is None else min(model, runtime)

    @property
    def failure(self) -> RuntimeFailure | None:
        """Why the engine stopped taking requests after a fault it could not recover from; None: healthy."""
        return self._failure

    # -- submitting ----------------------------------------------------------------------------

    def check(self, ids: list[list[int]], options: GenerationOptions, stream: bool = True) -> Request:
        """Every problem with a request, raised before it is queued (options.build_request)."""
        graph, ctx = self.runtime.graph, self.max_context
        try:
            return build_request(ids, options, self.tokenizer, context=ctx,
                                 attentions=graph.signature.attentions, graph=graph.name, stream=stream)
        except ContextOverflowError as exc:
            if exc.param is None:  # the option to change: the prompt when it fills the context alone
                exc.param = "prompt" if max(map(len, ids)) >= ctx else "max_new_tokens"
            raise

    def enqueue(
        self, req: Request, timeout: float | None = None, request_id: str | None = None
    ) -> list[Ticket]:
        """Queue one job per prompt of a checked request; they join the batch together, room allowing.
        Row b samples with its own stream, seeded as options.row_sampling says."""
        if timeout is not None and not timeout > 0:
            raise GenerationError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        now, n = time.perf_counter(), len(req.prompts)
        with self._cond:
            if self._failure is not None:
                raise RuntimeFailure(f"{self._failure} No new requests are taken.")
            if not self._accepting:
                raise RequestAborted(
                    "the engine is closed (shutting down); no new requests are taken", "shutdown"
                )
            if self.max_queue is not None:
                if n > self.max_batch + self.max_queue:  # it could never start, however long it waited
                    raise GenerationError(
                        f"this request has {n} prompts; this engine runs {self.max_batch} at a time "
                        f"and queues {self.max_queue} more. Send at most "
                        f"{self.max_batch + self.max_queue} prompts per request."
                    )
                # Waiting jobs take the free rows first; only those beyond the free rows queue.
                free = self._free_rows()
                if len(self._pending) + n - free > self.max_queue:
                    raise QueueFullError(
                        f"{max(0, len(self._pending) - free)} requests are already waiting for a batch "
                        f"row (the queue holds {self.max_queue}); retry in a moment"
                    )
            deadline = None if timeout is None else now + timeout
            jobs = [self._job(req, b, now, deadline, request_id) for b in range(len(req.prompts))]
            self._pending.extend(jobs)
            self._start()
            self._cond.notify_all()
        return [j.ticket for j in jobs]

    def _job(self, req: Request, b: int, now: float, deadline: float | None, request_id: str | None) -> Job:
        single = request_id and len(req.prompts) == 1
        ticket = Ticket(request_id if single else f"{request_id or 'req'}-{next(self._ids)}", self._wake)
        ticket.t_submit, ticket.max_new_tokens = now, req.max_new_tokens
        ticket.prompt_tokens = len(req.prompts[b])
        return Job(ticket, req.prompts[b], req, row_sampling(req.sampling, b), self.tokenizer, deadline)

    @takes_options
    def submit(self, prompt: str | Sequence[int], *, timeout: float | None = None, **options) -> Ticket:
        """One request, from any thread: iterate the ticket for text pieces, or `wait()` for the result."""
        vocab = self.bundle.config.vocab_size
        ids = encode(self.tokenizer, prompt) if isinstance(prompt, str) else check_ids(prompt, vocab)
        return self.enqueue(self.check([ids], GenerationOptions.of(options)), timeout)[0]

    @takes_options
    async def stream(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **options
    ) -> AsyncIterator[str]:
        """`async for piece in engine.stream(...)`: text pieces; stopping early cancels the request."""
        ticket = self.submit(prompt, timeout=timeout, **options)
        try:
            async for piece in ticket.apieces():
                yield piece
        finally:
            ticket.cancel()  # a no-op when it finished

    def occupancy(self) -> tuple[int, int]:
        """(requests waiting, requests in the batch), for metrics and health."""
        with self._cond:
            return len(self._pending), sum(not job.done for job in self._rows)

    # -- lifetime ------------------------------------------------------------------------------

    def stop_accepting(self, grace: float | None = None) -> None:
        """Take no new requests. Those in flight go on for at most `grace` more seconds (None: no
        limit); then they end with RequestAborted("shutdown"). Returns at once."""
        with self._cond:
            self._accepting, self._stopping = False, True
            if grace is not None:
                at = time.perf_counter() + grace
                self._abort_at = at if self._abort_at is None else min(self._abort_at, at)
            self._cond.notify_all()

    def close(self, grace: float | None = None) -> None:
        """stop_accepting(grace), wait for the requests in flight to end, then release the runtime."""
        self.stop_accepting(grace)
        with self._cond:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.runtime.close()

    def __enter__(self) -> Engine:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:  # holding self._cond
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gptdeploy-engine", daemon=True)
            self._thread.start()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _free_rows(self) -> int:  # holding self._cond
        """Rows that waiting jobs can take at the next round. A runtime that cannot move its cache
        (can_move_cache) takes joiners only once its whole batch is done."""
        active = sum(not job.done for job in self._rows)
        return self.max_batch - active if self._moves_cache or not active else 0

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception as exc:  # the loop's own fault, or a runtime that failed even to reset
            log.exception("the batching engine stopped: it could not recover from a fault")
            self._fail_everything(exc)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._rows and not self._stopping:
                    self._cond.wait()
                if not self._pending and not self._rows:
                    return  # stopping, and nothing is left in flight
                joiners = self._admit(time.perf_counter())
            try:
                self._round(joiners)
            except Exception as exc:  # noqa: BLE001 - any fault of a step: _recover logs it and fails its requests
                self._recover(joiners, exc)

    def _recover(self, joiners: list[Job], exc: Exception) -> None:
        """A step failed: its requests fail with RuntimeFailure and the runtime starts over empty.
        The request was checked before it was queued, so whatever a step raises is not the caller's
        fault. A reset that fails too propagates, and the loop ends (_fail_everything)."""
        log.error("engine step failed on the %s runtime", self.runtime.name, exc_info=exc)
        error = self._as_failure(exc)
        for job in [*joiners, *self._rows]:
            if not job.done:
                job.fail(error)
        self._rows = []
        self.runtime.reset()

    def _fail_everything(self, exc: Exception) -> None:
        """Fail every request held, take no more, and say why in `failure`."""
        failure = RuntimeFailure(
            f"the batching engine stopped after a fault it could not recover from "
            f"({_describe(exc)}); load the bundle again (a server: restart it)."
        )
        with self._cond:
            self._failure, self._accepting = failure, False
            jobs = [*self._pending, *self._rows]
            self._pending.clear()
            self._rows = []
        for job in jobs:
            if not job.done:
                job.fail(failure)

    def _as_failure(self, exc: Exception) -> RuntimeFailure:
        if isinstance(exc, RuntimeFailure):
            return exc
        if isinstance(exc, GptDeployError):  # a runtime's own check (a CUDA call, a shape): its message
            return RuntimeFailure(" ".join(str(exc).split()))
        return RuntimeFailure(f"the engine failed running a step on the {self.runtime.name} runtime ({_describe(exc)})")

    def _admit(self, now: float) -> list[Job]:
        """Waiting jobs that join now (as many as free rows); ended waiting jobs are failed."""
        if self._abort_at is not None and now >= self._abort_at:
            self._aborting = True
        for job in list(self._pending):
            if why := job.ended_early(now, self._aborting):
                self._pending.remove(job)
                job.fail(why)
        room = min(self._free_rows(), len(self._pending))
        if self._moves_cache:
            return [self._pending.popleft() for _ in range(room)]
        # A static batch: every row is fed until the last one ends, so the cache grows to the widest
        # prompt plus the longest generation, which must fit as each request alone had to. Joiners
        # are taken in order while they fit; the rest wait for the next batch.
        joiners: list[Job] = []
        while len(joiners) < room:
            group = [*joiners, self._pending[0]]
            widest, longest = max(len(j.prompt) for j in group), max(j.max_new_tokens for j in group)
            if joiners and widest + longest > self.max_context:
                break
            joiners.append(self._pending.popleft())
        return joiners

    def _round(self, joiners: list[Job]) -> None:
        now = time.perf_counter()
        for job in self._rows:
            if not job.done and (why := job.ended_early(now, self._aborting)):
                job.fail(why)  # its row is free now: reused or dropped below, before any step
        done = [job.done for job in self._rows]
        if (joiners or any(done)) if self._moves_cache else (all(done) and (joiners or done)):
            self._relayout(joiners)
        if self._rows:
            self._decode()

    def _relayout(self, joiners: list[Job]) -> None:
        """Joiners prefill and take free rows (or new ones); free rows nobody took are dropped."""
        stay = [(r, job) for r, job in enumerate(self._rows) if not job.done]
        main = self.runtime.take_cache() if stay else None
        placed = self._prefill(joiners) if joiners else {}  # {prefill row: job}
        if self._moves_cache:  # else a job done at its first token keeps its row, fed padding
            placed = {j: job for j, job in placed.items() if not job.done}
        rows: list[Job | None] = [None if job.done else job for job in self._rows]
        for job in placed.values():
            free = rows.index(None) if None in rows else len(rows)
            rows[free : free + 1] = [job]
        self._rows = [job for job in rows if job is not None]
        if all(job.done for job in self._rows):
            self._rows = []
            self.runtime.reset()
        elif stay or len(placed) < len(joiners):  # else the joiners' prefill cache is the batch as is
            sources = [main or [], self.runtime.take_cache() if placed else []]
            where = {id(job): (0, r) for r, job in stay} | {id(job): (1, j) for j, job in placed.items()}
            self.runtime.put_cache(gather(sources, [(*where[id(job)], job.length) for job in self._rows]))

    def _prefill(self, joiners: list[Job]) -> dict[int, Job]:
        """Run the joiners' prompts as one left-padded batch; each samples its first token."""
        ids, mask = left_pad([job.prompt for job in joiners], self.tokenizer.pad_token_id)  # (J, L)
        record = any(job.record_attention for job in joiners)
        out = self.runtime.prefill(ids, mask, positions(mask), record)
        for j, job in enumerate(joiners):
            if job.record_attention:
                job.keep_prefill(out.attentions, j, ids.shape[1] - len(job.prompt))
            self._advance(job, out.logits[j])
        return dict(enumerate(joiners))

    def _decode(self) -> None:
        """One step for every row; rows whose job is done are fed padding."""
        rows, pad = self._rows, self.tokenizer.pad_token_id
        t0 = time.perf_counter()
        lengths = np.array([job.length for job in rows])  # (B,)
        mask, pos = step_inputs(lengths, self.runtime.past_length)  # (B, P+1), (B, 1)
        ids = np.array([[pad if job.done else job.last] for job in rows], dtype=np.int64)  # (B, 1)
        record = any(job.record_attention and not job.done for job in rows)
        active = sum(not job.done for job in rows)  # the requests this step advances
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
            job.fail(self._as_failure(exc))
            return
        if finished:
            job.finish()


def _describe(exc: BaseException) -> str:
    """`Type: message`, on one line and short: for one-line errors."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
