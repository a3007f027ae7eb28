"""The response bodies OpenAI's API returns, field for field (openai-python's Completion,
ChatCompletion and their chunk types parse them), and the server-sent-event framing of a stream:
`data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`.

Beyond OpenAI's fields, an audited response carries `audit_record` ({"index", "sha256"} of its
record in the log); clients keep unknown fields (openai-python: `.model_extra`).
"""

from __future__ import annotations

import json
import time

from gptdeploy.results import GenerationResult

DONE = b"data: [DONE]\n\n"
# gptdeploy's finish reasons -> OpenAI's: an EOS, a stop id and a stop string all end with "stop".
FINISH = {"eos": "stop", "stop_token": "stop", "stop_string": "stop", "length": "length"}


# Characters that JSON may carry raw but that line splitters other than SSE's own treat as line
# breaks (Python's str.splitlines, which httpx's iter_lines uses; JavaScript line separators): escaped,
# so an event is always one line. JSON's own escapes, so every parser reads the same text.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\u0085": "\\u0085"})


def event(obj: dict) -> bytes:
    """One server-sent event: `data: {json}` on one line (UTF-8, line breaks escaped), then a blank line."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)
    return b"data: " + text.encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _head(rid: str, obj: str, model: str, created: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None}


def completion(rid: str, model: str, results: list[GenerationResult], audit: list[dict | None]) -> dict:
    body = _head(rid, "text_completion", model, int(time.time()))
    body["choices"] = [
        {"index": i, "text": r.text, "logprobs": None, "finish_reason": FINISH[r.finish_reason]}
        for i, r in enumerate(results)
    ]
    body["usage"] = usage(
        sum(len(r.prompt_token_ids) for r in results), sum(len(r.token_ids) for r in results)
    )
    return _with_audit(body, audit)


def chat_completion(rid: str, model: str, result: GenerationResult, audit: dict | None) -> dict:
    body = _head(rid, "chat.completion", model, int(time.time()))
    body["choices"] = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": result.text, "refusal": None},
            "logprobs": None,
            "finish_reason": FINISH[result.finish_reason],
        }
    ]
    body["usage"] = usage(len(result.prompt_token_ids), len(result.token_ids))
    return _with_audit(body, [audit])


def _with_audit(body: dict, audit: list[dict | None]) -> dict:
    if any(a is not None for a in audit):
        body["audit_record"] = audit[0] if len(audit) == 1 else audit
    return body


class Chunks:
    """The chunks of one streamed response: text pieces, the finish, usage (when asked for)."""

    def __init__(self, rid: str, model: str, chat: bool):
        self.rid, self.model, self.chat = rid, model, chat
        self.created = int(time.time())
        self._obj = "chat.completion.chunk" if chat else "text_completion"

    def _chunk(self, choice: dict | None) -> dict:
        body = _head(self.rid, self._obj, self.model, self.created)
        body["choices"] = [] if choice is None else [{"index": 0, **choice}]
        return body

    def start(self) -> bytes | None:
        """Chat streams open with the assistant role and empty content, as OpenAI's do."""
        if not self.chat:
            return None
        return event(
            self._chunk(
                {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            )
        )

    def piece(self, text: str) -> bytes:
        if self.chat:
            return event(self._chunk({"delta": {"content": text}, "logprobs": None, "finish_reason": None}))
        return event(self._chunk({"text": text, "logprobs": None, "finish_reason": None}))

    def finish(self, result: GenerationResult, audit: dict | None) -> bytes:
        reason = FINISH[result.finish_reason]
        choice = (
            {"delta": {}, "logprobs": None, "finish_reason": reason}
            if self.chat
            else {"text": "", "logprobs": None, "finish_reason": reason}
        )
        body = self._chunk(choice)
        if audit is not None:
            body["audit_record"] = audit
        return event(body)

    def usage(self, result: GenerationResult) -> bytes:
        body = self._chunk(None)
        body["usage"] = usage(len(result.prompt_token_ids), len(result.token_ids))
        return event(body)


def error_event(body: dict) -> bytes:
    """An error inside a stream: openai-python raises APIError on a chunk with an "error" key."""
    return event(body)


def models(model: str, created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "gptdeploy"}],
    }
