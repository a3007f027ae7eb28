"""Per-row text state: stop rules, and which text is final enough to hand out.

A piece is released only when no later token can change it: the incremental decoder holds
back incomplete characters, and we hold back a tail that could still grow into a stop string
(the stop string itself is never shown, in streaming or not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gptdeploy.errors import GenerationError
from gptdeploy.tokenizer import IncrementalDecoder, Tokenizer


@dataclass(frozen=True)
class StopRules:
    strings: tuple[str, ...] = ()
    token_ids: frozenset[int] = frozenset()
    eos_token_ids: frozenset[int] = frozenset()  # any of them ends the row with finish_reason "eos"

    @classmethod
    def build(
        cls, stop: str | Sequence[str], stop_token_ids: Sequence[int], tokenizer: Tokenizer
    ) -> StopRules:
        strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
        problems = [
            f"stop strings must be non-empty strings, got {s!r}"
            for s in strings
            if not isinstance(s, str) or not s
        ]
        ids = []
        for i in stop_token_ids or ():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < tokenizer.vocab_size:
                problems.append(f"stop token id {i!r} is not in the vocabulary [0, {tokenizer.vocab_size})")
            else:
                ids.append(i)
        if problems:
            raise GenerationError("; ".join(problems))
        return cls(strings, frozenset(ids), frozenset(tokenizer.eos_token_ids))


class RowText:
    """One row's generated ids and text, and how much of the text was handed out.

    `incremental=False` (no stream, no stop strings: nothing needs the text before the end)
    defers detokenization to the row's last token; the same decoder then runs over the same
    ids, so the text is exactly what streaming would have produced.
    """

    def __init__(self, tokenizer: Tokenizer, stops: StopRules, prompt_ids: Sequence[int], incremental: bool):
        self._detok = IncrementalDecoder(tokenizer, prompt_ids)
        self._stops = stops
        self._longest_stop = max((len(s) for s in stops.strings), default=0)
        self._incremental = incremental or bool(stops.strings)
        self.token_ids: list[int] = []
        self.text = ""
        self.finished = False
        self.finish_reason = ""
        self._emitted = 0  # chars of `text` handed out
        self._searched = 0  # chars of `text` already searched for stop strings

    def push(self, token_id: int, last: bool) -> str:
        """Add the row's next token (`last`: max_new_tokens reached); return newly final text."""
        self.token_ids.append(token_id)
        if token_id in self._stops.eos_token_ids:
            self._finish("eos")
        elif token_id in self._stops.token_ids:
            self._finish("stop_token")
        elif self._incremental:
            self.text += self._detok.push(token_id)
        if not (self.finished or last):
            return self._release() if self._incremental else ""
        if not self._incremental:
            body = self.token_ids[:-1] if self.finished else self.token_ids  # the EOS / stop id is not text
            self.text = "".join([self._detok.push(t) for t in body])
        self.text += self._detok.flush()
        if self._longest_stop:
            self._cut_at_stop()
        self._finish("length")  # no-op when an EOS, stop id or stop string came first
        return self._release()

    def _finish(self, reason: str) -> None:
        if not self.finished:
            self.finished, self.finish_reason = True, reason

    def _cut_at_stop(self) -> None:
        start = max(0, self._searched - self._longest_stop + 1)
        hits = [i for s in self._stops.strings if (i := self.text.find(s, start)) >= 0]
        self._searched = len(self.text)
        if hits:
            self.text = self.text[: min(hits)]
            self._finish("stop_string")

    def _release(self) -> str:
        if self._longest_stop and not self.finished:
            self._cut_at_stop()
        end = len(self.text) if self.finished else len(self.text) - self._held_tail()
        if end <= self._emitted:
            return ""
        piece, self._emitted = self.text[self._emitted : end], end
        return piece

    def _held_tail(self) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of a stop string."""
        room = len(self.text) - self._emitted
        held = 0
        for s in self._stops.strings:
            for k in range(min(len(s) - 1, room), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held
