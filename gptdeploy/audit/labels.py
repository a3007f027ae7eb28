"""Readable labels for the tokens of a record: what a person reading an audit sees per position."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

REPLACEMENT = "\ufffd"
_LABEL_RUN = 8  # tokens joined at most to complete one character for a label


@dataclass(frozen=True)
class Tokens:
    text: str
    ids: list[int]
    tokens: list[str]  # the tokenizer's vocabulary strings, exact ("Ġthe", "<|endoftext|>")
    labels: list[str]  # readable: " the"; a character split over n tokens is "你[1/2]", "你[2/2]"


def token_labels(decode, vocab: Sequence[str], ids: Sequence[int]) -> list[str]:
    """Readable per-token text. Byte-level BPE splits a CJK character over tokens whose own
    decode is U+FFFD: such a run is decoded together and each token labelled "你[k/n]". Bytes
    that never form a character are shown as escapes ("\\xe4")."""
    labels: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        text = decode(ids[i : j + 1])
        while text.endswith(REPLACEMENT) and j + 1 < len(ids) and j - i + 1 < _LABEL_RUN:
            j += 1
            text = decode(ids[i : j + 1])
        if REPLACEMENT in text:  # no complete character: this token alone, as its bytes
            labels.append(_bytes_label(vocab[i]) if j > i or REPLACEMENT in decode(ids[i : i + 1]) else text)
            i += 1
            continue
        n = j - i + 1
        labels += [text] if n == 1 else [f"{text}[{k + 1}/{n}]" for k in range(n)]
        i = j + 1
    return labels


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (bytes_to_unicode, Radford et al. 2019), inverted."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _bytes_label(token: str) -> str:
    table = _byte_decoder()
    if token and all(ch in table for ch in token):
        return bytes(table[ch] for ch in token).decode("utf-8", errors="backslashreplace")
    return token  # e.g. SentencePiece's byte-fallback "<0xE4>" says it already


