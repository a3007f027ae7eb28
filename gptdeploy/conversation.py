"""A chat over one Generator that keeps its history within the model's context (`gptdeploy chat`).

    convo = Conversation(gen, ChatTemplate.from_bundle(gen.bundle), system="Be brief.")
    with convo.reply("你好", max_new_tokens=64) as reply:
        for piece in reply: print(piece, end="")
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from gptdeploy.chat import ChatTemplate, chat_prompt_ids
from gptdeploy.errors import ContextOverflowError, GenerationError
from gptdeploy.options import GenerationOptions

if TYPE_CHECKING:
    from gptdeploy.generate import Generator, TextStream
    from gptdeploy.results import GenerationResult


class Conversation:
    """A chat over one Generator: an optional system message, then user/assistant turns. Before
    each reply the oldest turns are dropped (never the system message) until the rendered history
    plus max_new_tokens fits the model's context."""

    def __init__(self, generator: Generator, template: ChatTemplate, system: str | None = None):
        self.generator = generator
        self.template = template
        self.system = system
        self.turns: list[tuple[str, str]] = []  # (user, assistant)

    def messages(self, user: str | None = None, start: int = 0) -> list[dict[str, str]]:
        """The conversation from turn `start` on, then `user`'s message if given."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for u, a in self.turns[start:]:
            out += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return out + ([{"role": "user", "content": user}] if user is not None else [])

    def reset(self) -> None:
        self.turns.clear()

    def fit(self, user: str, max_new_tokens: int) -> tuple[list[int], int]:
        """Prompt ids for `user` after the history, and how many old turns it drops for room. They
        leave the history only when the message fits; a message too long alone changes nothing."""
        ctx = self.generator.max_context
        for start in range(len(self.turns) + 1):
            ids = chat_prompt_ids(self.generator, self.messages(user, start), self.template)
            if len(ids) + max_new_tokens <= ctx:
                del self.turns[:start]
                return ids, start
        raise ContextOverflowError(
            f"this message{' with the system message' if self.system else ''} is {len(ids)} tokens; with "
            f"max_new_tokens {max_new_tokens} it needs {len(ids) + max_new_tokens} positions, the model has "
            f"{ctx}. Shorten the message or lower max_new_tokens."
        )

    def reply(self, user: str, **options) -> Reply:
        """The assistant's reply to `user`, streamed; the turn joins the history once it is read to the end."""
        if not isinstance(user, str) or not user:
            raise GenerationError("a chat message must be a non-empty string")
        ids, dropped = self.fit(user, GenerationOptions.of(options).max_new_tokens)
        return Reply(self, user, self.generator.stream_ids(ids, **options), dropped)


class Reply:
    """Text pieces of one assistant reply; `result` once read to the end; `dropped`: old turns
    dropped from the history to make room for it."""

    def __init__(self, conversation: Conversation, user: str, stream: TextStream, dropped: int):
        self._conversation, self._user, self._stream = conversation, user, stream
        self.dropped = dropped
        self.result: GenerationResult | None = None
        self._pieces = self._iterate()

    def _iterate(self) -> Iterator[str]:
        with self._stream as pieces:
            yield from pieces
        self.result = self._stream.result
        self._conversation.turns.append((self._user, self.result.text))

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def close(self) -> None:
        self._pieces.close()

    def __enter__(self) -> Reply:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Conversation", "Reply"]
