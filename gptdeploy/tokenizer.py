"""The bundle's tokenizer (`tokenizers` JSON) and incremental detokenization for streaming.

Torch-free and transformers-free: only the `tokenizers` library.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import tokenizers

from gptdeploy.bundle import Bundle
from gptdeploy.errors import BundleError, GenerationError
from gptdeploy.manifest import TokenizerEntry

REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode makes of an incomplete byte sequence
SHOWN = 8  # offending characters or words named in the error, at most


class Tokenizer:
    """Text <-> token ids, with the special ids the manifest declares."""

    def __init__(self, tok: tokenizers.Tokenizer, entry: TokenizerEntry):
        self._tok = tok
        self.entry = entry
        self._alphabet = silent_drop_alphabet(tok)  # None unless the tokenizer drops what it lacks

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Tokenizer:
        entry = bundle.manifest.tokenizer
        path = bundle.file(entry.file)
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare `Exception` for every parse error
            raise BundleError(f"cannot read tokenizer {entry.file!r}: {str(exc).splitlines()[0]}") from None
        have = tok.get_vocab_size(with_added_tokens=True)
        rows = bundle.config.vocab_size
        if have > rows:
            raise BundleError(
                f"tokenizer {entry.file!r} has {have} tokens but the model has only {rows} embedding rows; "
                "the bundle pairs a tokenizer with the wrong model"
            )
        return cls(tok, entry)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce; logits columns from here on are padding and never sampled."""
        return self.entry.vocab_size

    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (the first of `eos_token_ids`)."""
        return self.entry.eos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation (Llama 3 and Qwen have several)."""
        return self.entry.stop_ids

    @property
    def bos_token_id(self) -> int | None:
        return self.entry.bos_token_id

    @functools.cached_property
    def adds_bos(self) -> bool:
        """Whether `encode` puts BOS in front: the manifest asks gptdeploy to, or tokenizer.json's
        own post-processor does (Llama's TemplateProcessing)."""
        bos = self.entry.bos_token_id
        if bos is None:
            return False
        return self.entry.add_bos_token or self._tok.encode("", add_special_tokens=True).ids[:1] == [bos]

    @property
    def pad_token_id(self) -> int:
        """Fed at left-padded positions (masked out, so any valid id works)."""
        for candidate in (self.entry.pad_token_id, self.entry.eos_token_id):
            if candidate is not None:
                return candidate
        return 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `add_special_tokens`: what the tokenizer's post-processor adds,
        and BOS in front when the manifest says gptdeploy must add it (never a second one).
        Without: the text alone (a rendered chat template writes its own special tokens)."""
        if not isinstance(text, str):
            raise GenerationError(f"a prompt must be a string, got {type(text).__name__}")
        try:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare `Exception` for unknown input
            raise GenerationError(self._refusal(text, exc)) from None
        if self._alphabet is not None:  # a BPE without an unknown token leaves such characters out
            norm = self._tok.normalizer.normalize_str(text) if self._tok.normalizer else text
            lost = [c for c in dict.fromkeys(norm) if c not in self._alphabet and not c.isspace()]
            if lost:
                raise GenerationError(_lacks(lost))
        bos = self.entry.bos_token_id
        if add_special_tokens and self.entry.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def _refusal(self, text: str, exc: Exception) -> str:
        """Why the tokenizer refused `text`, naming exactly the pieces it cannot encode."""
        pieces = unencodable(self._tok, text)
        if not pieces:  # refused only in context: the tokenizer's own words are all we have
            return f"the tokenizer cannot encode the prompt ({str(exc).splitlines()[0]}); rephrase it"
        return _lacks(pieces)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens kept (an audit must show what the model produced)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


def unencodable(tok: tokenizers.Tokenizer, text: str) -> list[str]:
    """The pieces of `text` that `tok` refuses, each once, in order of appearance.

    A piece is what the tokenizer's own pre-tokenizer hands its model (one character for a
    character vocabulary, a word for a word-level one), and is refused when encoding it alone
    fails. In a refused word, the characters that occur in no token of the vocabulary are named
    instead (no tokenization can produce them); a word made of known characters is named whole."""
    norm = tok.normalizer.normalize_str(text) if tok.normalizer else text
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(norm)] if tok.pre_tokenizer else [norm]
    known: set[str] | None = None
    found: list[str] = []
    for piece in dict.fromkeys(pieces):
        if _encodes(tok, piece):
            continue
        if len(piece) > 1:
            known = known if known is not None else set("".join(tok.get_vocab(with_added_tokens=True)))
            found += [c for c in dict.fromkeys(piece) if c not in known] or [piece]
        else:
            found.append(piece)
    return list(dict.fromkeys(found))


def silent_drop_alphabet(tok: tokenizers.Tokenizer) -> frozenset[str] | None:
    """The characters a tokenizer that silently drops the others can produce, or None where
    nothing is dropped. A BPE model without an unknown token and without byte fallback encodes a
    character it has no token for as nothing at all (`tokenizers` 0.2x: "hello \u2603" -> the
    ids of "hello"), unless a byte-level pre-tokenizer first maps every byte to a character of
    its alphabet. Every other model either has an unknown token or refuses (`unencodable`)."""
    model = tok.model
    if not isinstance(model, tokenizers.models.BPE) or model.unk_token or model.byte_fallback:
        return None
    if tok.pre_tokenizer is not None and b'"ByteLevel"' in tok.pre_tokenizer.__getstate__():
        return None
    return frozenset("".join(tok.get_vocab(with_added_tokens=True)))


def _lacks(pieces: list[str]) -> str:
    """The one-line refusal naming what the vocabulary lacks."""
    shown = ", ".join(_describe(p) for p in pieces[:SHOWN]) + (
        f" and {len(pieces) - SHOWN} more" if len(pieces) > SHOWN else "")
    what = "characters" if all(len(p) == 1 for p in pieces) else "text"
    return f"the prompt has {what} the model's vocabulary lacks: {shown}; remove or replace them"


def _encodes(tok: tokenizers.Tokenizer, text: str) -> bool:
    try:
        tok.encode(text, add_special_tokens=False)
    except Exception:  # noqa: BLE001 - see Tokenizer.encode
        return False
    return True


def _describe(piece: str) -> str:
    """'é' (U+00E9): the code point tells apart look-alikes and names invisible characters."""
    return f"{piece!r} (U+{ord(piece):04X})" if len(piece) == 1 else repr(piece)


class IncrementalDecoder:
    """Turns a growing id sequence into text pieces that never split a character.

    Byte-level BPE cuts a CJK character's three UTF-8 bytes across tokens, so decoding one
    token alone yields U+FFFD. We decode a short window and release its new text only once it
    no longer ends in U+FFFD (the approach of Hugging Face TGI and vLLM). A few tokens of
    context before the first generated one keep tokenizers that drop a leading space on the
    first token (SentencePiece's Metaspace) from doing so mid-sentence.
    """

    CONTEXT = 4  # prompt tokens kept as left context

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self._tok = tokenizer
        self._ids = list(context[-self.CONTEXT :]) if self.CONTEXT else []
        self._prefix = 0  # window start
        self._read = len(self._ids)  # end of the ids whose text was already released
        self._prefix_text = tokenizer.decode(self._ids) if self._ids else ""

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", never a broken character)."""
        self._ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Release whatever is held back (an invalid byte sequence stays U+FFFD)."""
        return self._release(final=True) if self._read < len(self._ids) else ""

    def _release(self, final: bool) -> str:
        text = self._tok.decode(self._ids[self._prefix :])
        if len(text) <= len(self._prefix_text) or (text.endswith(REPLACEMENT) and not final):
            if final:  # the held bytes decode to nothing visible
                self._read = len(self._ids)
            return ""
        piece = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        return piece
