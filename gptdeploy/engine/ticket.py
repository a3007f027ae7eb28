"""A caller's handle on one request in the batching engine: text pieces as they become final,
then the GenerationResult, or the error that ended the request. numpy-free, thread-safe.

The engine thread pushes; any number of threads may wait, and one consumer takes the pieces,
either blocking (`for piece in ticket`) or in an asyncio loop (`async for piece in ticket.apieces()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

from gptdeploy.errors import GptDeployError, RequestAborted
from gptdeploy.results import GenerationResult

log = logging.getLogger(__name__)


class Ticket:
    """One request's output. `cancel()` ends it and frees its batch row at the next step."""

    def __init__(self, request_id: str, wake_engine: Callable[[], None]):
        self.id = request_id
        self._wake_engine = wake_engine
        self._cond = threading.Condition()
        self._pieces: deque[str] = deque()
        self._ended = False
        self._loops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False  # the caller asked; the engine ends the request at its next round
        self.result: GenerationResult | None = None
        self.error: GptDeployError | None = None
        self.t_submit = 0.0  # time.perf_counter() when queued
        self.max_new_tokens = 0  # the request's limit
        self.prompt_tokens = 0  # the prompt's length in tokens
        self._callbacks: list[Callable[[Ticket], None]] = []
        self.token_times: list[float] = []  # perf_counter() of each generated token, set at the end

    # -- the engine's side ----------------------------------------------------------------------

    def _piece(self, text: str) -> None:
        with self._cond:
            self._pieces.append(text)
            self._notify()

    def _end(
        self,
        result: GenerationResult | None = None,
        error: GptDeployError | None = None,
        token_times: list[float] | None = None,
    ) -> None:
        with self._cond:
            if self._ended:
                return
            self._ended, self.result, self.error = True, result, error
            self.token_times = token_times or []
            self._notify()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            self._call(callback)

    def _call(self, callback: Callable[[Ticket], None]) -> None:
        try:
            callback(self)
        except Exception:  # an observer's bug must not stop the engine thread that ends tickets
            log.exception("a done callback of request %s failed", self.id)

    def _notify(self) -> None:  # holding self._cond
        self._cond.notify_all()
        for loop, event in self._loops:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its consumer is gone
                pass

    # -- the caller's side ----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._ended

    def add_done_callback(self, callback: Callable[[Ticket], None]) -> None:
        """Call `callback(ticket)` once the request has ended, however it ended (on the engine's
        thread; at once, on this one, if it has ended already). For observers such as metrics."""
        with self._cond:
            if not self._ended:
                self._callbacks.append(callback)
                return
        self._call(callback)

    def cancel(self) -> None:
        """End the request (RequestAborted, reason "cancelled"); a no-op once it has ended."""
        with self._cond:
            if self._ended or self.cancelled:
                return
            self.cancelled = True
        self._wake_engine()

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request ends; its result, or the error that ended it."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._ended, timeout):
                raise RequestAborted(f"request {self.id} did not finish within {timeout} s", "timeout")
        return self._outcome()

    def __iter__(self) -> Iterator[str]:
        """Text pieces as they become final (taken: one consumer); raises the error that ended it."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pieces or self._ended)
                if not self._pieces:
                    break
                piece = self._pieces.popleft()
            yield piece
        self._outcome()

    async def apieces(self) -> AsyncIterator[str]:
        """`__iter__` for an asyncio loop: awaits without blocking the loop."""
        with self._woken() as event:
            while True:
                with self._cond:
                    piece = self._pieces.popleft() if self._pieces else None
                    if piece is None and self._ended:
                        break
                    if piece is None:
                        event.clear()  # under the lock: a push after this schedules event.set
                if piece is None:
                    await event.wait()
                else:
                    yield piece
        self._outcome()

    async def await_result(self) -> GenerationResult:
        """`wait()` for an asyncio loop. The pieces are left for a consumer (the result has the text)."""
        with self._woken() as event:
            while True:
                with self._cond:
                    if self._ended:
                        break
                    event.clear()
                await event.wait()
        return self._outcome()

    @contextlib.contextmanager
    def _woken(self) -> Iterator[asyncio.Event]:
        """An event of the running asyncio loop, set (thread-safely) at every push and at the end."""
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._loops.append((loop, event))
        try:
            yield event
        finally:
            with self._cond:
                self._loops.remove((loop, event))

    def _outcome(self) -> GenerationResult:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result
