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

from gptdeploy.bundle import Bundle
from gptdeploy.engine.batch import Batch, as_failure, describe
from gptdeploy.engine.job import Job
from gptdeploy.engine.ticket import Ticket
from gptdeploy.errors import (
    GenerationError,
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
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._batch = Batch(runtime, tokenizer.pad_token_id, on_step)  # the engine thread's own
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
        graph = self.runtime.graph
        return build_request(ids, options, self.tokenizer, context=self.max_context,
                             attentions=graph.signature.attentions, graph=graph.name, stream=stream)

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
            return len(self._pending), self._batch.active()

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
        return self._batch.free_rows(self.max_batch)

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
                while not self._pending and not self._batch.rows and not self._stopping:
                    self._cond.wait()
                if not self._pending and not self._batch.rows:
                    return  # stopping, and nothing is left in flight
                joiners = self._admit(time.perf_counter())
            try:
                self._batch.round(joiners, time.perf_counter(), self._aborting)
            except Exception as exc:  # noqa: BLE001 - any fault of a step: _recover logs it and fails its requests
                self._recover(joiners, exc)

    def _recover(self, joiners: list[Job], exc: Exception) -> None:
        """A step failed: its requests fail with RuntimeFailure and the runtime starts over empty.
        The request was checked before it was queued, so whatever a step raises is not the caller's
        fault. A reset that fails too propagates, and the loop ends (_fail_everything)."""
        log.error("engine step failed on the %s runtime", self.runtime.name, exc_info=exc)
        self._batch.fail(as_failure(exc, self.runtime.name), joiners)

    def _fail_everything(self, exc: Exception) -> None:
        """Fail every request held, take no more, and say why in `failure`."""
        failure = RuntimeFailure(
            f"the batching engine stopped after a fault it could not recover from "
            f"({describe(exc)}); load the bundle again (a server: restart it)."
        )
        with self._cond:
            self._failure, self._accepting = failure, False
            jobs = [*self._pending, *self._batch.rows]
            self._pending.clear()
            self._batch.rows = []
        for job in jobs:
            if not job.done:
                job.fail(failure)

    def _admit(self, now: float) -> list[Job]:
        """Waiting jobs that join now (as many as free rows); ended waiting jobs are failed."""
        if self._abort_at is not None and now >= self._abort_at:
            self._aborting = True
        for job in list(self._pending):
            if why := job.ended_early(now, self._aborting):
                self._pending.remove(job)
                job.fail(why)
        room = min(self._free_rows(), len(self._pending))
        if self._batch.moves_cache:
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
