"""Generator: prompts in, text out, over any runtime. numpy only: never imports torch.

    gen = Generator.load("out/sample")
    out = gen.generate("我喜欢", max_new_tokens=40, temperature=0.8, top_k=50, seed=7)
    for piece in gen.stream("Once upon a time", max_new_tokens=64): print(piece, end="")

Sampling: `temperature=0` (the default) is greedy; `temperature > 0` samples, seeded by
`seed`. Every call runs through the batching engine (gptdeploy.engine): calls from several
threads share decode steps, and each gets exactly the result it gets alone. A list of prompts
becomes one request per prompt that start together; each stops on its own (EOS, stop ids,
stop strings), and row b samples with its own stream seeded `seed + b` (options.row_sampling).
The options are gptdeploy.options.GenerationOptions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from gptdeploy.bundle import Bundle
from gptdeploy.engine import Engine, EngineLimits, Ticket
from gptdeploy.errors import GenerationError
from gptdeploy.options import GenerationOptions, check_ids, encode, takes_options
from gptdeploy.results import FINISH_REASONS, GenerationResult, Timings
from gptdeploy.runtimes.backends import open_runtime
from gptdeploy.runtimes.base import RuntimeBase
from gptdeploy.tokenizer import Tokenizer

DEFAULT_LIMITS = EngineLimits()  # 16 rows, no queue bound

__all__ = ["FINISH_REASONS", "GenerationOptions", "GenerationResult", "Generator", "TextStream", "Timings"]


class Generator:
    """Generation over one runtime and one tokenizer; owns the runtime (close() or `with`)."""

    def __init__(self, runtime: RuntimeBase, tokenizer: Tokenizer, bundle: Bundle,
                 limits: EngineLimits = DEFAULT_LIMITS):
        self.engine = Engine(runtime, tokenizer, bundle, limits)

    @classmethod
    def load(
        cls,
        bundle_dir: str | os.PathLike,
        backend: str = "auto",
        graph: str | None = None,
        threads: int | None = None,
        verify_hashes: bool = True,
        limits: EngineLimits = DEFAULT_LIMITS,
    ) -> Generator:
        """Load and check a bundle, then open `backend` ("auto": the best one available) on it."""
        bundle = Bundle.load(bundle_dir, verify_hashes=verify_hashes)
        tokenizer = Tokenizer.from_bundle(bundle)
        return cls(open_runtime(bundle, backend, graph, threads), tokenizer, bundle, limits)

    @property
    def runtime(self) -> RuntimeBase:
        return self.engine.runtime

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def bundle(self) -> Bundle:
        return self.engine.bundle

    @property
    def max_context(self) -> int:
        """Positions a request may use here: the model's context, or less where the runtime is bound
        (a TensorRT engine built with a smaller --max-context)."""
        return self.engine.max_context

    # -- public API: the options of each call are GenerationOptions' fields ------------------

    @takes_options
    def generate(self, prompt: str | Sequence[str], **options) -> GenerationResult | list[GenerationResult]:
        """One prompt -> one result; a list of prompts -> a list of results, started together."""
        single = isinstance(prompt, str)
        if not single and not isinstance(prompt, Sequence):
            raise GenerationError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        texts = [prompt] if single else list(prompt)
        if not texts:
            raise GenerationError("no prompts given")
        results = _wait(self._submit([encode(self.tokenizer, t) for t in texts], options))
        return results[0] if single else results

    @takes_options
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], **options) -> list[GenerationResult]:
        """Like `generate` on prompts given as token ids (one list per row)."""
        ids = [check_ids(p, self.bundle.config.vocab_size) for p in prompt_ids]
        if not ids:
            raise GenerationError("no prompts given")
        return _wait(self._submit(ids, options))

    @takes_options
    def stream(self, prompt: str, **options) -> TextStream:
        """Text pieces as they are generated; they concatenate to `generate(...)`'s text and never
        split a character. Arguments are checked now and the work starts at once; the finished
        stream's `.result` holds the whole result (with attention when recorded)."""
        if not isinstance(prompt, str):
            raise GenerationError("stream takes one prompt string; use generate() for a batch")
        return TextStream(self._submit([encode(self.tokenizer, prompt)], options, stream=True)[0])

    @takes_options
    def stream_ids(self, prompt_ids: Sequence[int], **options) -> TextStream:
        """Like `stream` on one prompt given as token ids (a rendered chat, for one)."""
        ids = check_ids(prompt_ids, self.bundle.config.vocab_size)
        return TextStream(self._submit([ids], options, stream=True)[0])

    def close(self) -> None:
        """Take no new calls, let those in flight (in any thread, open streams too) finish, then
        release the runtime."""
        self.engine.close()

    def __enter__(self) -> Generator:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _submit(self, ids: list[list[int]], options: dict, stream: bool = False) -> list[Ticket]:
        return self.engine.enqueue(self.engine.check(ids, GenerationOptions.of(options), stream))


def _wait(tickets: list[Ticket]) -> list[GenerationResult]:
    """Every ticket's result; the first failure cancels the others and is raised."""
    try:
        return [t.wait() for t in tickets]
    finally:
        for t in tickets:
            t.cancel()  # a no-op for those that finished


class TextStream:
    """Iterate for text pieces; `result` holds the full GenerationResult once iteration ends.
    Close it (or use `with`) if you stop early: that cancels the request and frees its batch row."""

    def __init__(self, ticket: Ticket):
        self._ticket = ticket
        self._pieces: Iterator[str] = iter(ticket)

    @property
    def result(self) -> GenerationResult | None:
        return self._ticket.result

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._ticket.cancel()

    def __enter__(self) -> TextStream:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()
