"""Generator: prompts in, text out, over any runtime. numpy only: never imports torch.

    gen = Generator.load("out/sample")
    out = gen.generate("我喜欢", max_new_tokens=40, temperature=0.8, top_k=50, seed=7)
    for piece in gen.stream("Once upon a time", max_new_tokens=64): print(piece, end="")

Sampling: `temperature=0` (the default) is greedy; `temperature > 0` samples, seeded by
`seed`. Batches are left-padded; each row stops on its own (EOS, stop ids, stop strings)
and is frozen while the others finish. One Generator serves one request at a time: calls
from several threads are serialized by a lock (each gets exactly the result it gets alone).
The options are gptdeploy.options.GenerationOptions; the loop is gptdeploy.decoding.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from gptdeploy import decoding
from gptdeploy.bundle import Bundle
from gptdeploy.errors import GenerationError
from gptdeploy.options import GenerationOptions, Request, build_request, check_ids, encode, takes_options
from gptdeploy.results import FINISH_REASONS, GenerationResult, Timings
from gptdeploy.runtimes.backends import open_runtime
from gptdeploy.runtimes.base import RuntimeBase
from gptdeploy.tokenizer import Tokenizer

__all__ = ["FINISH_REASONS", "GenerationOptions", "GenerationResult", "Generator", "TextStream", "Timings"]


class Generator:
    """Generation over one runtime and one tokenizer; owns the runtime (close() or `with`)."""

    def __init__(self, runtime: RuntimeBase, tokenizer: Tokenizer, bundle: Bundle):
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.bundle = bundle
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread id holding the lock, to refuse same-thread re-entry

    @classmethod
    def load(
        cls,
        bundle_dir: str | os.PathLike,
        backend: str = "auto",
        graph: str | None = None,
        threads: int | None = None,
        verify_hashes: bool = True,
    ) -> Generator:
        """Load and check a bundle, then open `backend` ("auto": the best one available) on it."""
        bundle = Bundle.load(bundle_dir, verify_hashes=verify_hashes)
        tokenizer = Tokenizer.from_bundle(bundle)
        return cls(open_runtime(bundle, backend, graph, threads), tokenizer, bundle)

    @property
    def max_context(self) -> int:
        return self.bundle.manifest.max_context

    # -- public API: the options of each call are GenerationOptions' fields ------------------

    @takes_options
    def generate(self, prompt: str | Sequence[str], **options) -> GenerationResult | list[GenerationResult]:
        """One prompt -> one result; a list of prompts -> a list of results, generated as one batch."""
        single = isinstance(prompt, str)
        if not single and not isinstance(prompt, Sequence):
            raise GenerationError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        texts = [prompt] if single else list(prompt)
        if not texts:
            raise GenerationError("no prompts given")
        results = self._drain(self._request([encode(self.tokenizer, t) for t in texts], options))
        return results[0] if single else results

    @takes_options
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], **options) -> list[GenerationResult]:
        """Like `generate` on prompts given as token ids (one list per row)."""
        ids = [check_ids(p, self.bundle.config.vocab_size) for p in prompt_ids]
        if not ids:
            raise GenerationError("no prompts given")
        return self._drain(self._request(ids, options))

    @takes_options
    def stream(self, prompt: str, **options) -> TextStream:
        """Text pieces as they are generated; they concatenate to `generate(...)`'s text and never
        split a character. Arguments are checked now; the work runs while you iterate; the
        finished stream's `.result` holds the whole result (with attention when recorded)."""
        if not isinstance(prompt, str):
            raise GenerationError("stream takes one prompt string; use generate() for a batch")
        return TextStream(self, self._request([encode(self.tokenizer, prompt)], options, stream=True))

    def close(self) -> None:
        """Release the runtime; waits for a call in progress in another thread. Called from the
        thread that holds an unfinished stream, it closes at once and that stream then fails cleanly."""
        if self._owner == threading.get_ident():
            self.runtime.close()
            return
        with self._lock:
            self.runtime.close()

    def __enter__(self) -> Generator:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the work ------------------------------------------------------------------------------

    def _request(self, ids: list[list[int]], options: dict, stream: bool = False) -> Request:
        graph = self.runtime.graph
        return build_request(ids, GenerationOptions.of(options), self.tokenizer, context=self.max_context,
                             attentions=graph.signature.attentions, graph=graph.name, stream=stream)

    @contextmanager
    def _exclusive(self):
        if self._owner == threading.get_ident():
            raise GenerationError(
                "this Generator is already generating in this thread (an unfinished stream?); "
                "exhaust or close() that stream first"
            )
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None
                self.runtime.reset()  # free the KV cache between requests

    def _drain(self, req: Request) -> list[GenerationResult]:
        it = self._run(req)
        while True:
            try:
                next(it)
            except StopIteration as done:
                return done.value

    def _run(self, req: Request) -> Iterator[tuple[int, str]]:
        """Yields (row, text piece) as text becomes final; returns the results."""
        with self._exclusive():
            return (yield from decoding.run(self.runtime, self.tokenizer, req))


class TextStream:
    """Iterate for text pieces; `result` holds the full GenerationResult once iteration ends.
    Close it (or use `with`) if you stop early, so the Generator is free for the next request."""

    def __init__(self, generator: Generator, req: Request):
        self._pieces = self._iterate(generator, req)
        self.result: GenerationResult | None = None

    def _iterate(self, generator: Generator, req: Request) -> Iterator[str]:
        run = generator._run(req)
        try:
            while True:
                try:
                    _, piece = next(run)
                except StopIteration as done:
                    self.result = done.value[0]
                    return
                yield piece
        finally:
            run.close()  # stopped early: release the Generator now, not at garbage collection

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    def __enter__(self) -> TextStream:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()
