"""Tokenizers for sources: tokenizer.json as is, GPT-2 vocab.json + merges.txt and nanoGPT
char vocabularies converted to tokenizer.json, with the settings beside them (tokenizer_settings.py)
and the EOS ids of generation_config.json, and how both are written into a bundle. One module,
shared by every loader."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from gptdeploy.errors import SourceError
from gptdeploy.exporters.sources.tokenizer_settings import TokenizerSettings, read_settings

if TYPE_CHECKING:
    from gptdeploy.exporters.sources.base import Tokenizer
    from gptdeploy.manifest import TokenizerEntry

log = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # its name in a bundle
EOT = "<|endoftext|>"  # GPT-2's end of text, also its bos (and the usual pad)
SPECIAL_KEYS = ("eos_token_id", "bos_token_id", "pad_token_id")


def read_tokenizer_json(path: Path) -> str:
    """A tokenizer.json's text, after checking that `tokenizers` accepts it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path} cannot be read ({exc}); restore the file") from None
    _parse(text, path)
    return text


def gpt2_bpe_json(vocab_path: Path, merges_path: Path) -> str:
    """vocab.json + merges.txt -> tokenizer.json, built as GPT-2's own tokenizer.json is
    (transformers' GPT2Converter): byte-level BPE, no prefix space, <|endoftext|> special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(
            f"cannot read {vocab_path.name} + {merges_path.name} in {vocab_path.parent}: {exc}"
        ) from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise SourceError(f"{vocab_path} must map token strings to integer ids")
    merges = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise SourceError(f"{merges_path}:{n} is not a merge pair ('a b'): {line[:40]!r}")
        merges.append((pair[0], pair[1]))
    try:
        tok = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        )
    except Exception as exc:  # tokenizers raises plain Exception for an inconsistent vocab/merges
        raise SourceError(
            f"{vocab_path.name} + {merges_path.name} do not form a BPE tokenizer: {exc}"
        ) from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if EOT in vocab:
        tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return tok.to_str()


def char_vocab_json(stoi: dict, where: str) -> str:
    """nanoGPT's character vocabulary (meta.pkl stoi) -> tokenizer.json: every character,
    newlines included, is one token; decoding concatenates without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    bad = [k for k, v in stoi.items() if not (isinstance(k, str) and len(k) == 1 and isinstance(v, int))]
    if bad or not stoi:
        raise SourceError(f"{where}: stoi must map single characters to integer ids (e.g. {bad[:3]!r})")
    if sorted(stoi.values()) != list(range(len(stoi))):
        raise SourceError(f"{where}: stoi ids must be 0..{len(stoi) - 1} without gaps")
    tok = Tokenizer(models.WordLevel(vocab=dict(stoi)))
    # [\s\S] and not ".": Oniguruma's "." stops at "\n", and newlines are tokens here.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok.to_str()


def from_dir(d: Path) -> tuple[str, list[Path]] | None:
    """(tokenizer.json text, files read) from a directory, or None when it holds neither form."""
    if (d / TOKENIZER_JSON).is_file():
        return read_tokenizer_json(d / TOKENIZER_JSON), [d / TOKENIZER_JSON]
    if (d / VOCAB_JSON).is_file() and (d / MERGES_TXT).is_file():
        return gpt2_bpe_json(d / VOCAB_JSON, d / MERGES_TXT), [d / VOCAB_JSON, d / MERGES_TXT]
    return None


def from_argument(path: Path) -> tuple[str, list[Path]]:
    """--tokenizer: a tokenizer.json file, or a directory with tokenizer.json or vocab.json + merges.txt."""
    if path.is_file():
        return read_tokenizer_json(path), [path]
    found = from_dir(path) if path.is_dir() else None
    if found is None:
        raise SourceError(
            f"--tokenizer {path} is neither a tokenizer.json file nor a directory holding "
            f"{TOKENIZER_JSON} or {VOCAB_JSON} + {MERGES_TXT}"
        )
    return found


def make_tokenizer(
    text: str,
    model_vocab: int,
    settings: list[dict],
    where: Path,
    tokenizer_settings: TokenizerSettings | None = None,
) -> Tokenizer:
    """base.Tokenizer for `text`. Special ids come from the first of `settings` (config.json,
    generation_config.json, ...) that names them, then from the token texts of `tokenizer_settings`,
    then <|endoftext|> if the vocabulary has it; the EOS ids are every one they name, in that order.
    `tokenizer_settings` defaults to read_settings(where) when `where` is a directory."""
    from gptdeploy.exporters.sources.base import Tokenizer

    tok = _parse(text, TOKENIZER_JSON)
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > model_vocab:
        raise SourceError(
            f"{where}: the tokenizer has {size} tokens but the model's embedding has only "
            f"{model_vocab} rows; is this the tokenizer the model was trained with?"
        )
    if tokenizer_settings is None:
        tokenizer_settings = read_settings(where) if Path(where).is_dir() else TokenizerSettings()
    ts = tokenizer_settings
    eot = tok.token_to_id(EOT)
    named = {key: _named_id(tok, ts.tokens.get(key.removesuffix("_id")), key, where) for key in SPECIAL_KEYS}
    found = {key: [i for s in settings for i in _token_ids(s.get(key), key, size)] for key in SPECIAL_KEYS}
    ids = {key: next(iter(found[key]), named[key] if named[key] is not None else eot) for key in SPECIAL_KEYS}
    # Every EOS id the settings name (config.json's, then generation_config.json's list), and
    # tokenizer_config's eos_token: a chat template ends its turns with it (<|im_end|>, <|eot_id|>).
    eos_ids = [i for i in dict.fromkeys([ids["eos_token_id"], *found["eos_token_id"], named["eos_token_id"]])
               if i is not None]
    if ts.add_eos_token:
        log.warning("%s: add_eos_token is set; gptdeploy never ends a prompt with EOS (it would end the "
                    "generation before it starts)", where)
    return Tokenizer(
        json=text,
        vocab_size=size,
        **ids,
        eos_token_ids=eos_ids,
        add_bos_token=_bos_to_add(tok, ts, ids["bos_token_id"], where),
        chat_template=ts.chat_template,
        special_tokens=dict(ts.tokens),
        settings_files=list(ts.files),
    )


def _named_id(tok, token: str | None, key: str, where: Path) -> int | None:
    if token is None:
        return None
    found = tok.token_to_id(token)
    if found is None:
        log.warning("%s: ignoring %s %r from the tokenizer settings: not a token of tokenizer.json",
                    where, key.removesuffix("_id"), token)
    return found


def _bos_to_add(tok, settings: TokenizerSettings, bos: int | None, where: Path) -> bool:
    """Whether gptdeploy must prepend BOS itself: the settings ask for it and tokenizer.json's
    post-processor does not already put it in front (Llama's TemplateProcessing does; a second
    one would change the model's input). Seen by encoding the empty text."""
    if not settings.add_bos_token:
        return False
    if bos is None:
        log.warning("%s: add_bos_token is set but no BOS token is known; no BOS is added", where)
        return False
    return tok.encode("", add_special_tokens=True).ids[:1] != [bos]


def write_bundle_files(tok: Tokenizer, directory: Path, tokenizer_file: str) -> tuple[TokenizerEntry, list[str]]:
    """Write the tokenizer (and its chat template) into a bundle directory: the manifest entry,
    and the files written (to be listed with their SHA-256)."""
    from gptdeploy.manifest import TokenizerEntry

    written = [tokenizer_file]
    (directory / tokenizer_file).write_text(tok.json, encoding="utf-8")
    template = None
    if tok.chat_template:
        template = CHAT_TEMPLATE_FILE
        (directory / template).write_text(tok.chat_template, encoding="utf-8")
        written.append(template)
    entry = TokenizerEntry(
        tokenizer_file, tok.vocab_size, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id,
        eos_token_ids=tuple(tok.eos_token_ids),
        add_bos_token=tok.add_bos_token,
        chat_template=template,
        special_tokens=dict(tok.special_tokens),
    )
    return entry, written


def _token_ids(value, key: str, size: int) -> list[int]:
    """The ids `value` names: an int, or a list of them (Llama 3 and Qwen list several EOS ids)."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    out = []
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < size:
            # Common in small models trained from GPT-2's config: eos 50256 with a 300-token vocabulary.
            log.warning("ignoring %s=%r: not a token id of this %d-token tokenizer", key, v, size)
        else:
            out.append(v)
    return out


def _parse(text: str, where):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises plain Exception on malformed JSON
        raise SourceError(
            f"{where} is not a valid tokenizers JSON ({' '.join(str(exc).split())[:200]})"
        ) from None
