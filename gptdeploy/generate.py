"""Generator: prompts in, text out, over any runtime. numpy only: never imports torch.

    gen = Generator.load("out/sample")
    out = gen.generate("我喜欢", max_new_tokens=40, temperature=0.8, top_k=50, seed=7)
    for piece in gen.stream("Once upon a time", max_new_tokens=64): print(piece, end="")

Sampling: `temperature=0` (the default) is greedy; `temperature > 0` samples, seeded by
`seed`. Batches are left-padded; each row stops on its own (EOS, stop ids, stop strings)
and is frozen while the others finish. One Generator serves one request at a time: calls
from several threads are serialized by a lock (each gets exactly the result it gets alone).
Shapes: B batch, L longest prompt, T new positions, P past positions, nh heads, V vocab.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from gptdeploy.bundle import Bundle
from gptdeploy.errors import ContextOverflowError, GenerationError
from gptdeploy.runtimes.base import RuntimeBase, open_runtime
from gptdeploy.sampling import Sampler, SamplingParams
from gptdeploy.textstate import RowText, StopRules
from gptdeploy.tokenizer import Tokenizer

FINISH_REASONS = ("eos", "stop_token", "stop_string", "length")


@dataclass(frozen=True)
class Timings:
    tokens: int  # tokens generated for this row
    time_to_first_token_s: float  # prefill + first sample, from the start of the work
    decode_tokens_per_s: float  # this row's tokens after the first / the time until it finished
    total_s: float  # the whole call (a batch finishes together)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationResult:
    text: str  # generated text only; cut before a stop string; EOS / stop ids not rendered
    token_ids: list[int]  # generated ids, the one that ended generation (EOS, stop id) included
    prompt_token_ids: list[int]
    finish_reason: str  # one of FINISH_REASONS
    timings: Timings
    sampling: SamplingParams  # as used: a seed drawn for an unseeded sampled call is filled in
    # With record_attention: per layer (1, nh, S, S) float32 over `attention_token_ids`, rows are
    # queries, zero above the diagonal; padding stripped. The last generated token was never fed
    # to the model, so S = len(prompt_token_ids) + len(token_ids) - 1.
    attention: list[np.ndarray] | None = None

    @property
    def attention_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.token_ids[:-1]


@dataclass(frozen=True)
class _Request:
    prompts: list[list[int]]
    max_new_tokens: int
    sampling: SamplingParams
    stops: StopRules
    record_attention: bool
    stream: bool = False  # text is needed as it comes (else it is decoded once, at the end)


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

    # -- public API -----------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        record_attention: bool = False,
    ) -> GenerationResult | list[GenerationResult]:
        """One prompt -> one result; a list of prompts -> a list of results, generated as one batch."""
        single = isinstance(prompt, str)
        if not single and not isinstance(prompt, Sequence):
            raise GenerationError(
                f"prompt must be a string or a list of strings, got {type(prompt).__name__}"
            )
        texts = [prompt] if single else list(prompt)
        if not texts:
            raise GenerationError("no prompts given")
        ids = [self._encode(t) for t in texts]
        sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        req = self._request(ids, max_new_tokens, sampling, stop, stop_token_ids, record_attention)
        results = self._drain(req)
        return results[0] if single else results

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        record_attention: bool = False,
    ) -> list[GenerationResult]:
        """Like `generate` on prompts given as token ids (one list per row)."""
        sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        ids = [self._check_ids(p) for p in prompt_ids]
        if not ids:
            raise GenerationError("no prompts given")
        return self._drain(
            self._request(ids, max_new_tokens, sampling, stop, stop_token_ids, record_attention)
        )

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        record_attention: bool = False,
    ) -> TextStream:
        """Text pieces as they are generated; they concatenate to `generate(...)`'s text and never
        split a character. Arguments are checked now; the work runs while you iterate; the
        finished stream's `.result` holds the whole result (with attention when recorded)."""
        if not isinstance(prompt, str):
            raise GenerationError("stream takes one prompt string; use generate() for a batch")
        sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        req = self._request(
            [self._encode(prompt)], max_new_tokens, sampling, stop, stop_token_ids, record_attention
        )
        return TextStream(self, replace(req, stream=True))

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

    # -- checks (all before any work) -------------------------------------------------------

    def _encode(self, text: object) -> list[int]:
        if not isinstance(text, str):
            raise GenerationError(f"a prompt must be a string, got {type(text).__name__}")
        if not text:
            raise GenerationError("the prompt is empty; give at least one character")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise GenerationError(f"the prompt {text[:20]!r} encodes to no tokens")
        return ids

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        if (
            isinstance(ids, (str, bytes))
            or not isinstance(ids, (Sequence, np.ndarray))
            or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids)
        ):
            raise GenerationError("prompt_ids must be lists of integer token ids, one list per prompt")
        ids = [int(i) for i in ids]
        if not ids:
            raise GenerationError("a prompt has no token ids")
        bad = [i for i in ids if not 0 <= i < self.bundle.config.vocab_size]
        if bad:
            raise GenerationError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.bundle.config.vocab_size})"
            )
        return ids

    def _request(self, ids, max_new_tokens, sampling, stop, stop_token_ids, record_attention) -> _Request:
        if (
            not isinstance(max_new_tokens, (int, np.integer))
            or isinstance(max_new_tokens, bool)
            or max_new_tokens < 1
        ):
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        stops = StopRules.build(stop, stop_token_ids, self.tokenizer)
        if not sampling.greedy and sampling.seed is None:
            # Draw the seed here and keep it in the result, so every sampled text can be reproduced.
            sampling = replace(sampling, seed=secrets.randbits(63))
        if record_attention and not self.runtime.graph.signature.attentions:
            raise GenerationError(
                f"graph {self.runtime.graph.name!r} has no attention outputs; "
                "choose a graph exported with them"
            )
        longest, ctx = max(len(p) for p in ids), self.max_context
        if longest >= ctx:
            raise ContextOverflowError(
                f"the prompt has {longest} tokens but the model's context is {ctx} positions; "
                f"shorten the prompt to at most {ctx - 1} tokens"
            )
        if longest + max_new_tokens > ctx:
            what = "the prompt" if len(ids) == 1 else "the longest prompt"
            raise ContextOverflowError(
                f"{what} ({longest} tokens) + max_new_tokens ({max_new_tokens}) needs "
                f"{longest + max_new_tokens} positions; the model has {ctx}. "
                f"Lower max_new_tokens to {ctx - longest} or shorten the prompt."
            )
        return _Request(ids, int(max_new_tokens), sampling, stops, bool(record_attention))

    # -- the loop -----------------------------------------------------------------------------

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

    def _drain(self, req: _Request) -> list[GenerationResult]:
        it = self._run(req)
        while True:
            try:
                next(it)
            except StopIteration as done:
                return done.value

    def _run(self, req: _Request) -> Iterator[tuple[int, str]]:
        """Yields (row, text piece) as text becomes final; returns the results."""
        with self._exclusive():
            return (yield from self._loop(req))

    def _loop(self, req: _Request):
        rt, tok = self.runtime, self.tokenizer
        V = tok.vocab_size
        B, N = len(req.prompts), req.max_new_tokens
        lens = np.array([len(p) for p in req.prompts])  # (B,)
        L = int(lens.max())
        pads = L - lens  # (B,) left padding per row
        ids = np.full((B, L), tok.pad_token_id, dtype=np.int64)  # (B, L)
        mask = np.zeros((B, L + N), dtype=np.int64)  # (B, L+N), grown one column per step
        for b, p in enumerate(req.prompts):
            ids[b, pads[b] :] = p
            mask[b, pads[b] : L] = 1
        positions = np.clip(np.cumsum(mask[:, :L], axis=1) - 1, 0, None)  # (B, L)
        seen = None
        if req.sampling.repetition_penalty != 1.0:
            seen = np.zeros((B, V), dtype=bool)  # (B, V)
            for b, p in enumerate(req.prompts):
                seen[b, [i for i in p if i < V]] = True
        sampler = Sampler(req.sampling)
        rows = [RowText(tok, req.stops, req.prompts[b], req.stream) for b in range(B)]
        finished = np.zeros(B, dtype=bool)  # (B,)
        n_finished = 0  # a Python count: numpy reductions on tiny arrays cost ~4 us each, per token
        t_done = [0.0] * B
        record = req.record_attention
        steps: list[list[np.ndarray]] = []  # per step, per layer (B, nh, T, P+T)

        t0 = time.perf_counter()
        out = rt.prefill(ids, mask[:, :L], positions, record)
        next_pos = positions[:, -1:] + 1  # (B, 1)
        t_first = t0
        for step in range(N):
            if record:
                steps.append(out.attentions)
            chosen = sampler(out.logits[:, :V], seen)  # (B,), padding columns never sampled
            if step == 0:
                t_first = time.perf_counter()
            last = step == N - 1
            for b, row in enumerate(rows):
                if not row.finished:
                    piece = row.push(int(chosen[b]), last)
                    if piece:
                        yield b, piece
                    if row.finished:
                        finished[b] = True
                        n_finished += 1
                        t_done[b] = time.perf_counter()
            if last or n_finished == B:
                break
            if seen is not None:
                seen[np.arange(B), chosen] = True
            if n_finished:
                chosen = np.where(finished, tok.pad_token_id, chosen)  # frozen rows feed padding
            mask[:, L + step] = 1
            out = rt.decode(chosen[:, None], mask[:, : L + step + 1], next_pos, record)  # (B, 1) ids
            next_pos = next_pos + 1
        t_end = time.perf_counter()

        results = []
        for b, row in enumerate(rows):
            n = len(row.token_ids)
            decode_s = (t_done[b] or t_end) - t_first
            timings = Timings(
                tokens=n,
                time_to_first_token_s=t_first - t0,
                decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
                total_s=t_end - t0,
            )
            attention = _assemble(steps, b, int(pads[b]), int(lens[b]), n) if record else None
            results.append(
                GenerationResult(
                    row.text,
                    row.token_ids,
                    list(req.prompts[b]),
                    row.finish_reason,
                    timings,
                    req.sampling,
                    attention,
                )
            )
        return results


class TextStream:
    """Iterate for text pieces; `result` holds the full GenerationResult once iteration ends.
    Close it (or use `with`) if you stop early, so the Generator is free for the next request."""

    def __init__(self, generator: Generator, req: _Request):
        self._pieces = self._iterate(generator, req)
        self.result: GenerationResult | None = None

    def _iterate(self, generator: Generator, req: _Request) -> Iterator[str]:
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


def _assemble(steps: list[list[np.ndarray]], b: int, pad: int, n_prompt: int, n_gen: int) -> list[np.ndarray]:
    """Row b's attention over its own positions: the prefill block plus one row per decode step
    that fed one of its tokens (frozen steps after it finished are left out)."""
    S = n_prompt + n_gen - 1
    out = []
    for layer, prefill in enumerate(steps[0]):
        nh = prefill.shape[1]
        att = np.zeros((1, nh, S, S), dtype=np.float32)  # (1, nh, S, S)
        att[0, :, :n_prompt, :n_prompt] = np.tril(prefill[b, :, pad:, pad:])  # (nh, Lb, Lb), causal
        for k in range(1, n_gen):  # decode step k fed generated token k-1: query position Lb+k-1
            q = n_prompt + k - 1
            att[0, :, q, : q + 1] = steps[k][layer][b, :, 0, pad:]  # (nh, Lb+k)
        out.append(att)
    return out
