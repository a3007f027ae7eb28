"""The request bodies of /v1/completions and /v1/chat/completions: every field OpenAI defines
(and vLLM's top_k, repetition_penalty, stop_token_ids), its JSON type and range, checked before
any work. A field of the wrong type or range is a 422 naming it; an unknown field, or a feature
this server does not have (n > 1, logprobs, tools, penalties other than 0), is a 400.
null means "the default", as in OpenAI's API. Defaults follow OpenAI: temperature 1, max_tokens
16 for completions and the room left in the context for chat.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gptdeploy.serve.errors import invalid, unprocessable

MAX_STOPS = 16
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class Spec:
    kinds: tuple[type, ...]  # JSON types accepted; bool is never a number
    rule: str  # what a valid value is, for the 422 message
    ok: Callable[[Any], bool] | None = None  # range and shape
    supported: Callable[[Any], bool] | None = None  # a valid value this server cannot honour: 400


NUMBER = (int, float)


def _strings(v) -> bool:
    items = [v] if isinstance(v, str) else v
    return len(items) <= MAX_STOPS and all(isinstance(s, str) and s for s in items)


def _ints(v) -> bool:
    return all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)


COMMON = {
    "model": Spec((str,), "a string"),
    "max_tokens": Spec((int,), "an integer >= 1", lambda v: v >= 1),
    "temperature": Spec(NUMBER, "a number in [0, 2]", lambda v: 0 <= v <= 2),
    "top_p": Spec(NUMBER, "a number in (0, 1]", lambda v: 0 < v <= 1),
    "n": Spec((int,), "an integer >= 1", lambda v: v >= 1, lambda v: v == 1),
    "stream": Spec((bool,), "true or false"),
    "stream_options": Spec(
        (dict,),
        'an object {"include_usage": bool}',
        lambda v: set(v) <= {"include_usage"} and isinstance(v.get("include_usage", False), bool),
    ),
    "stop": Spec((str, list), f"a non-empty string or a list of at most {MAX_STOPS}", _strings),
    "seed": Spec((int,), "an integer >= 0", lambda v: v >= 0),
    "presence_penalty": Spec(NUMBER, "a number in [-2, 2]", lambda v: -2 <= v <= 2, lambda v: v == 0),
    "frequency_penalty": Spec(NUMBER, "a number in [-2, 2]", lambda v: -2 <= v <= 2, lambda v: v == 0),
    "logit_bias": Spec((dict,), "an object", supported=lambda v: not v),
    "user": Spec((str,), "a string"),
    # vLLM's extensions, with vLLM's names
    "top_k": Spec((int,), "an integer >= 0 (0: off)", lambda v: v >= 0),
    "repetition_penalty": Spec(NUMBER, "a number > 0 (1: off)", lambda v: v > 0),
    "stop_token_ids": Spec((list,), "a list of token ids", _ints),
}
COMPLETIONS = COMMON | {
    "prompt": Spec((str, list), "a string, a list of strings, or token ids"),
    "echo": Spec((bool,), "true or false", supported=lambda v: not v),
    "logprobs": Spec((int,), "an integer >= 0", lambda v: v >= 0, lambda v: v == 0),
    "best_of": Spec((int,), "an integer >= 1", lambda v: v >= 1, lambda v: v == 1),
    "suffix": Spec((str,), "a string", supported=lambda v: False),
}
CHAT = COMMON | {
    "messages": Spec((list,), "a non-empty list of messages", lambda v: len(v) > 0),
    "max_completion_tokens": Spec((int,), "an integer >= 1", lambda v: v >= 1),
    "logprobs": Spec((bool,), "true or false", supported=lambda v: not v),
    "top_logprobs": Spec((int,), "an integer >= 0", supported=lambda v: False),
    "response_format": Spec((dict,), "an object", supported=lambda v: v.get("type") == "text"),
    "tools": Spec((list,), "a list", supported=lambda v: not v),
    "tool_choice": Spec((str, dict), "a string or an object", supported=lambda v: v == "none"),
    "parallel_tool_calls": Spec((bool,), "true or false"),
}


@dataclass(frozen=True)
class Parsed:
    """A checked request: what to run and how to answer."""

    model: str
    prompts: list[str | list[int]]  # completions: each prompt (text or token ids) is one choice
    messages: list[dict[str, str]] | None  # chat: role/content strings
    options: dict  # GenerationOptions fields; max_new_tokens None: the room left (chat)
    stream: bool
    include_usage: bool


def parse_completion(body: object) -> Parsed:
    v = _check(body, COMPLETIONS, required=("model", "prompt"))
    prompts = _prompts(v["prompt"])
    if v.get("stream") and len(prompts) > 1:
        raise invalid(
            "streaming takes one prompt per request; send one request per prompt", "prompt", "unsupported"
        )
    return Parsed(
        v["model"],
        prompts,
        None,
        _options(v, v.get("max_tokens", COMPLETIONS_MAX_TOKENS)),
        bool(v.get("stream")),
        bool(v.get("stream_options", {}).get("include_usage")),
    )


def parse_chat(body: object) -> Parsed:
    v = _check(body, CHAT, required=("model", "messages"))
    messages = [_message(i, m) for i, m in enumerate(v["messages"])]
    limit = v.get("max_completion_tokens", v.get("max_tokens"))
    return Parsed(
        v["model"],
        [],
        messages,
        _options(v, limit),
        bool(v.get("stream")),
        bool(v.get("stream_options", {}).get("include_usage")),
    )


def _check(body: object, specs: dict[str, Spec], required: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(specs))
    if unknown:
        raise invalid(
            f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0], "unknown_parameter"
        )
    for name in required:
        if body.get(name) is None:
            raise invalid(f"{name} is required", name, "missing_required_parameter")
    out = {}
    for name, value in body.items():
        if value is None:
            continue
        spec = specs[name]
        if not _is(value, spec.kinds) or (spec.ok is not None and not spec.ok(value)):
            raise unprocessable(f"{name} must be {spec.rule}, got {_show(value)}", name)
        if spec.supported is not None and not spec.supported(value):
            raise invalid(f"{name}={_show(value)} is not supported by this server", name, "unsupported")
        out[name] = value
    return out


def _is(value: object, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, kinds)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _prompts(prompt: str | list) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return [list(prompt)]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if prompt and all(isinstance(p, list) and p and _ints(p) for p in prompt):
        return [list(p) for p in prompt]
    raise unprocessable(
        "prompt must be a string, a list of strings, a list of token ids or a list of such lists, none empty",
        "prompt",
    )


def _message(i: int, m: object) -> dict[str, str]:
    """One chat message as role/content strings; content parts of type "text" are joined."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
        raise unprocessable(f'{where} must be an object with a "role" string and a "content"', where)
    unknown = sorted(set(m) - {"role", "content", "name"})
    if unknown:
        raise invalid(
            f"{where} has fields this server does not support: {', '.join(unknown)}", where, "unsupported"
        )
    content = m.get("content")
    if isinstance(content, list):
        if not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            raise invalid(f'{where}.content: only parts of type "text" are supported', where, "unsupported")
        content = "".join(p["text"] for p in content)
    if content is None and m["role"] == "assistant":
        content = ""
    if not isinstance(content, str):
        raise unprocessable(f"{where}.content must be a string or a list of text parts", where)
    return {"role": m["role"], "content": content}


def _options(v: dict, max_tokens: int | None) -> dict:
    stop = v.get("stop", [])
    return {
        "max_new_tokens": max_tokens,
        "temperature": float(v.get("temperature", 1.0)),
        "top_p": float(v.get("top_p", 1.0)),
        "top_k": v.get("top_k", 0),
        "repetition_penalty": float(v.get("repetition_penalty", 1.0)),
        "seed": v.get("seed"),
        "stop": [stop] if isinstance(stop, str) else list(stop),
        "stop_token_ids": list(v.get("stop_token_ids", [])),
    }
