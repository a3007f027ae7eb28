"""What a caller may ask of a generation, defined once, and its checks before any work.

`GenerationOptions` holds every keyword that `Generator.generate`, `generate_ids` and `stream`
take (and that a server request maps to); `Request` is the checked form the decode loop runs.
"""

from __future__ import annotations

import functools
import inspect
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

from gptdeploy.errors import ContextOverflowError, GenerationError
from gptdeploy.sampling import SamplingParams
from gptdeploy.textstate import StopRules
from gptdeploy.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationOptions:
    """The keyword arguments of every generation call, with their defaults (greedy, 64 tokens)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy; > 0: sample, seeded by `seed`
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None with temperature > 0: one is drawn and reported in the result
    stop: Sequence[str] = ()  # stop strings (never shown in the text)
    stop_token_ids: Sequence[int] = ()
    record_attention: bool = False

    @classmethod
    def of(cls, options: dict) -> GenerationOptions:
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise GenerationError(f"unknown generation option(s) {', '.join(unknown)}; "
                                  f"known: {', '.join(f.name for f in fields(cls))}")
        return cls(**options)


def takes_options(method):
    """Give `method(self, prompt, **options)` the keyword-only signature of GenerationOptions,
    so help() and IDEs show every option with its default, while the defaults live in one place."""
    sig = inspect.signature(method)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in fields(GenerationOptions)]

    @functools.wraps(method)
    def wrapper(self, *args, **options):
        return method(self, *args, **options)

    wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper


@dataclass(frozen=True)
class Request:
    """A checked generation: token ids per row and how to continue them."""

    prompts: list[list[int]]
    max_new_tokens: int
    sampling: SamplingParams  # as used: a seed drawn for an unseeded sampled call is filled in
    stops: StopRules
    record_attention: bool
    stream: bool = False  # text is needed as it comes (else it is decoded once, at the end)


def row_sampling(sampling: SamplingParams, row: int) -> SamplingParams:
    """Row `row`'s sampling in a request of several prompts. Each row samples with its own random
    stream, seeded `seed + row`: a row samples the same alone or among others, and row b of a
    batch made with seed s is reproduced by its prompt alone with seed s + b (the seed its
    result reports). Greedy rows have no seed."""
    if sampling.greedy or row == 0:
        return sampling
    return replace(sampling, seed=sampling.seed + row)


def encode(tokenizer: Tokenizer, text: object) -> list[int]:
    if not isinstance(text, str):
        raise GenerationError(f"a prompt must be a string, got {type(text).__name__}")
    if not text:
        raise GenerationError("the prompt is empty; give at least one character")
    ids = tokenizer.encode(text)
    if not ids:
        raise GenerationError(f"the prompt {text[:20]!r} encodes to no tokens")
    return ids


def check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    if (
        isinstance(ids, (str, bytes))
        or not isinstance(ids, (Sequence, np.ndarray))
        or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids)
    ):
        raise GenerationError("prompt_ids must be lists of integer token ids, one list per prompt")
    ids = [int(i) for i in ids]
    if not ids:
        raise GenerationError("a prompt has no token ids")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise GenerationError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return ids


def build_request(ids: list[list[int]], options: GenerationOptions, tokenizer: Tokenizer, *,
                  context: int, attentions: bool, graph: str, stream: bool = False) -> Request:
    """Check `options` against the prompts and the model; every problem is raised before any work."""
    n = options.max_new_tokens
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {n!r}")
    o = options
    sampling = SamplingParams(o.temperature, o.top_k, o.top_p, o.repetition_penalty, o.seed)
    stops = StopRules.build(o.stop, o.stop_token_ids, tokenizer)
    if not sampling.greedy and sampling.seed is None:
        # Drawn here and kept in the result, so every sampled text can be reproduced.
        sampling = replace(sampling, seed=secrets.randbits(63))
    if o.record_attention and not attentions:
        raise GenerationError(f"graph {graph!r} has no attention outputs; choose a graph exported with them")
    _check_fits(ids, int(n), context)
    return Request(ids, int(n), sampling, stops, bool(o.record_attention), stream)


def _check_fits(ids: list[list[int]], n: int, ctx: int) -> None:
    longest = max(len(p) for p in ids)
    if longest >= ctx:
        raise ContextOverflowError(
            f"the prompt has {longest} tokens but the model's context is {ctx} positions; "
            f"shorten the prompt to at most {ctx - 1} tokens",
            "prompt",
        )
    if longest + n > ctx:
        what = "the prompt" if len(ids) == 1 else "the longest prompt"
        raise ContextOverflowError(
            f"{what} ({longest} tokens) + max_new_tokens ({n}) needs {longest + n} positions; "
            f"the model has {ctx}. Lower max_new_tokens to {ctx - longest} or shorten the prompt.",
            "max_new_tokens",
        )
