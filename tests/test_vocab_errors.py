"""A prompt the tokenizer refuses (characters a character vocabulary lacks): one GenerationError
naming exactly the offending characters, from the API and the CLI, for every tokenizer kind
that refuses unknown input (WordLevel, WordPiece and Unigram without an unknown token), and for
a BPE without an unknown token or byte fallback, which `tokenizers` lets drop them silently."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from tokenizers import Regex, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HfTokenizer

from gptdeploy import Generator
from gptdeploy.cli import cli
from gptdeploy.errors import GenerationError
from gptdeploy.manifest import TokenizerEntry
from gptdeploy.tokenizer import Tokenizer, unencodable

SAMPLE_TOKENIZER = Path(__file__).parents[1] / "samples" / "tiny-gpt" / "tokenizer.json"
LACKS_E = "the prompt has characters the model's vocabulary lacks: 'é' (U+00E9); remove or replace them"


@pytest.fixture(scope="module")
def char_bundle(tmp_path_factory):
    """A nanoGPT checkpoint with meta.pkl: a character vocabulary without an unknown token."""
    from tests.factories import make_nanogpt_ckpt
    from tests.runtime_bundles import write_bundle

    root = tmp_path_factory.mktemp("char-vocab")
    ckpt = make_nanogpt_ckpt(root / "nano", n_layer=1, n_head=2, n_embd=16, block_size=32)
    return write_bundle(ckpt, root / "bundle")


def _chars(alphabet: str) -> HfTokenizer:
    """As exporters/sources/tokenizer_files.char_vocab_json builds nanoGPT's vocabulary."""
    tok = HfTokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(sorted(set(alphabet)))}))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return tok


def _words(*words: str) -> HfTokenizer:
    tok = HfTokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _wordpiece() -> HfTokenizer:
    tok = HfTokenizer(models.WordPiece(vocab={"h": 0, "##e": 1, "##l": 2, "##o": 3}))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _wrap(tok: HfTokenizer) -> Tokenizer:
    return Tokenizer(tok, TokenizerEntry("tokenizer.json", tok.get_vocab_size()))


def test_generate_and_stream_name_the_missing_character(char_bundle):
    with Generator.load(char_bundle, backend="ort", threads=1) as gen:
        with pytest.raises(GenerationError) as err:
            gen.generate("héllo", max_new_tokens=2)
        assert str(err.value) == LACKS_E
        with pytest.raises(GenerationError, match="lacks: 'ö' \\(U\\+00F6\\)"):
            gen.generate(["hello", "wörld"], max_new_tokens=2)  # a batch names the row's characters
        with pytest.raises(GenerationError, match="lacks: 'é'"):
            gen.stream("héllo", max_new_tokens=2)  # checked when the stream is asked for, not mid-way
        assert gen.generate("hello", max_new_tokens=2).token_ids  # known characters still work


@pytest.mark.parametrize("stream", [False, True])
def test_cli_is_one_error_line_exit_2(char_bundle, stream):
    r = CliRunner().invoke(cli, ["generate", str(char_bundle), "héllo 😀", *(["--stream"] if stream else [])])
    assert r.exit_code == 2, (r.output, r.exception)
    want = "the prompt has characters the model's vocabulary lacks: 'é' (U+00E9), '😀' (U+1F600); remove or replace them"
    assert r.stderr.strip().splitlines() == [f"error: {want}"]
    assert "Traceback" not in r.output and r.stdout == ""


@pytest.mark.parametrize(
    "tok,text,want",
    [
        (_chars("helo wrd\n"), "héllo wörld é\u200b", ["é", "ö", "\u200b"]),  # each once, invisible ones too
        (_words("hello", "world"), "héllo world", ["é"]),  # in no token of the vocabulary
        (_words("hello", "world"), "world wolrd", ["wolrd"]),  # known characters, unknown word
        (_wordpiece(), "hello héllo", ["é"]),
        # no pre-tokenizer: the whole text is one piece, and its space is a character like any other
        (HfTokenizer(models.Unigram([("h", -1.0), ("e", -1.0), ("l", -1.0), ("o", -1.0)])), "hello héllo", [" ", "é"]),
    ],
    ids=["char-level", "word-level-char", "word-level-word", "wordpiece", "unigram"],
)
def test_unencodable_finds_exactly_the_refused_pieces(tok, text, want):
    assert unencodable(tok, text) == want
    with pytest.raises(Exception):  # noqa: B017 - tokenizers raises a bare Exception
        tok.encode(text)


def test_normalized_text_is_what_is_checked():
    tok = _chars("hello")
    tok.normalizer = normalizers.Lowercase()
    assert _wrap(tok).encode("HELLO") == _wrap(tok).encode("hello")  # upper case is known after lowering
    with pytest.raises(GenerationError, match="lacks: 'é'"):
        _wrap(tok).encode("HÉLLO")  # named as the model sees it: lowered


def test_message_says_text_for_words_and_caps_the_list():
    with pytest.raises(GenerationError, match="the prompt has text the model's vocabulary lacks: 'wolrd'; "):
        _wrap(_words("hello", "world")).encode("hello wolrd")
    with pytest.raises(GenerationError) as err:
        _wrap(_chars("ab")).encode("abcdefghijklm")
    assert str(err.value).startswith("the prompt has characters the model's vocabulary lacks: 'c' (U+0063)")
    assert "'j' (U+006A) and 3 more;" in str(err.value)  # eight named, the rest counted


def _bpe(**kwargs) -> HfTokenizer:
    """A BPE over a few letters (h, e, l, o, 'he'), split on whitespace: SentencePiece-style
    vocabularies are BPE models, some with neither an unknown token nor byte fallback."""
    tok = HfTokenizer(models.BPE(vocab={"h": 0, "e": 1, "l": 2, "o": 3, "he": 4}, merges=[("h", "e")], **kwargs))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_a_bpe_without_an_unknown_token_is_refused_not_silently_shortened():
    tok = _bpe()
    assert tok.encode("hello \u2603 lo").ids == tok.encode("hello lo").ids  # what tokenizers does: drops it
    with pytest.raises(GenerationError) as err:
        _wrap(tok).encode("hello \u2603 lo")
    assert str(err.value) == "the prompt has characters the model's vocabulary lacks: '\u2603' (U+2603); remove or replace them"
    assert _wrap(tok).encode("hello  lo\n") == tok.encode("hello  lo\n").ids  # whitespace is the pre-tokenizer's


def test_tokenizers_that_keep_every_character_are_not_checked():
    with_unk = HfTokenizer(models.BPE(vocab={"h": 0, "e": 1, "<unk>": 2}, merges=[], unk_token="<unk>"))
    assert _wrap(with_unk).encode("h\u2603") == [0, 2]  # the unknown token stands in
    fallback = HfTokenizer(models.BPE(vocab={"h": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}, merges=[],
                                      byte_fallback=True))
    assert len(_wrap(fallback).encode("h\u2603")) == 4  # h and the snowman's three UTF-8 bytes
    byte_level = HfTokenizer.from_file(str(SAMPLE_TOKENIZER))  # byte-level BPE, no unk
    assert _wrap(byte_level).encode("\u2603")  # every byte has a character of its alphabet
    normalized = _bpe()
    normalized.normalizer = normalizers.NFKC()  # full-width 'ｈ' is 'h' once normalized
    assert _wrap(normalized).encode("\uff48ello") == _wrap(normalized).encode("hello")
