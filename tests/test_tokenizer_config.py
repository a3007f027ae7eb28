"""Tokenizer settings from a source (tokenizer_config.json, special_tokens_map.json,
chat_template.jinja, generation_config.json's EOS ids) into the bundle's manifest, and how the
runtime uses them: generation stops on any EOS id; BOS is prepended when the manifest says so,
and never twice."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from gptdeploy.bundle import Bundle
from gptdeploy.errors import BundleError, SourceError
from gptdeploy.exporters.sources import tokenizer_files as tf
from gptdeploy.exporters.sources import tokenizer_settings as ts
from gptdeploy.generate import Generator
from gptdeploy.manifest import MANIFEST, Manifest, TokenizerEntry
from gptdeploy.tokenizer import Tokenizer
from tests.factories import EOT, tokenizer_json
from tests.runtime_bundles import made

EOT_ID = 296  # the test tokenizer's <|endoftext|>, its last id
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def _bos_first_json() -> str:
    """The test tokenizer with Llama's post-processor: TemplateProcessing puts BOS in front."""
    from tokenizers import Tokenizer as Raw
    from tokenizers import processors

    tok = Raw.from_str(tokenizer_json())
    tok.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", special_tokens=[(EOT, EOT_ID)])
    return tok.to_str()


def _dir(tmp_path: Path, **files) -> Path:
    for name, content in files.items():
        name = name.replace("__", ".")
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return tmp_path


# -------------------------------------------------------------------------- reading the settings


def test_tokens_as_strings_or_added_token_dicts_and_the_flags(tmp_path):
    d = _dir(tmp_path, tokenizer_config__json={
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "special": True},
        "eos_token": "</s>", "pad_token": None, "unk_token": 7, "add_bos_token": True, "add_eos_token": False,
        "chat_template": CHATML,
    })
    s = ts.read_settings(d)
    assert s.tokens == {"bos_token": "<s>", "eos_token": "</s>"}  # null dropped, 7 ignored with a warning
    assert (s.add_bos_token, s.add_eos_token, s.chat_template) == (True, False, CHATML)
    assert s.files == (d / "tokenizer_config.json",)


def test_special_tokens_map_fills_what_tokenizer_config_leaves_out(tmp_path):
    d = _dir(tmp_path, special_tokens_map__json={"bos_token": "<a>", "eos_token": "<b>"},
             tokenizer_config__json={"eos_token": "<c>"})
    assert ts.read_settings(d).tokens == {"bos_token": "<a>", "eos_token": "<c>"}


def test_a_template_list_gives_default_and_chat_template_jinja_wins(tmp_path, caplog):
    listed = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    d = _dir(tmp_path, tokenizer_config__json={"chat_template": listed})
    assert ts.read_settings(d).chat_template == "D"
    (d / "chat_template.jinja").write_text("J", encoding="utf-8")
    assert ts.read_settings(d).chat_template == "J"  # transformers: the file overrides the config
    (d / "chat_template.jinja").unlink()
    _dir(d, tokenizer_config__json={"chat_template": [{"name": "rag", "template": "R"}]})
    with caplog.at_level(logging.WARNING):
        assert ts.read_settings(d).chat_template is None
    assert "none named 'default'" in caplog.text and "--chat-template" in caplog.text


def test_a_chat_template_of_another_type_is_a_source_error(tmp_path):
    d = _dir(tmp_path, tokenizer_config__json={"chat_template": {"default": "x"}})
    with pytest.raises(SourceError, match="chat_template must be a string or a list"):
        ts.read_settings(d)


def test_no_settings_files_is_no_settings(tmp_path):
    assert ts.read_settings(tmp_path) == ts.TokenizerSettings()


# ---------------------------------------------------------------------------- EOS ids and BOS


def test_every_eos_id_is_kept_and_the_first_stays_primary(tmp_path):
    d = _dir(tmp_path, tokenizer_config__json={"eos_token": "."})
    dot = _raw_tokenizer().token_to_id(".")
    tok = tf.make_tokenizer(tokenizer_json(), 297, [{"eos_token_id": 5}, {"eos_token_id": [5, 9, 11]}], d)
    assert tok.eos_token_id == 5 and tok.eos_token_ids == [5, 9, 11, dot]  # tokenizer_config's eos joins last
    assert tok.special_tokens == {"eos_token": "."} and tok.settings_files == [d / "tokenizer_config.json"]


def test_eos_from_tokenizer_config_alone_and_out_of_range_ids_ignored(tmp_path, caplog):
    d = _dir(tmp_path, tokenizer_config__json={"eos_token": "."})
    dot = _raw_tokenizer().token_to_id(".")
    with caplog.at_level(logging.WARNING):
        tok = tf.make_tokenizer(tokenizer_json(), 297, [{"eos_token_id": [50256, 99999]}], d)
    assert tok.eos_token_id == dot and tok.eos_token_ids == [dot]
    assert "ignoring eos_token_id=50256" in caplog.text


def test_no_settings_fall_back_to_endoftext(tmp_path):
    tok = tf.make_tokenizer(tokenizer_json(), 297, [], tmp_path)
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, tok.eos_token_ids) == (EOT_ID, EOT_ID, EOT_ID, [EOT_ID])
    assert not tok.add_bos_token and tok.chat_template is None


@pytest.mark.parametrize(("flag", "bos_first", "expected"), [
    (True, False, True),  # asked for, and tokenizer.json does not add it: gptdeploy must
    (True, True, False),  # tokenizer.json's post-processor already adds it
    (False, False, False),
    (None, False, False),
])
def test_add_bos_token_only_when_the_post_processor_does_not_add_it(tmp_path, flag, bos_first, expected):
    config = {"bos_token": EOT} | ({} if flag is None else {"add_bos_token": flag})
    d = _dir(tmp_path, tokenizer_config__json=config)
    text = _bos_first_json() if bos_first else tokenizer_json()
    assert tf.make_tokenizer(text, 297, [], d).add_bos_token is expected


def test_settings_are_written_into_the_bundle_entry(tmp_path):
    (tmp_path / "src").mkdir()
    d = _dir(tmp_path / "src", tokenizer_config__json={"eos_token": EOT, "add_bos_token": True, "chat_template": CHATML})
    tok = tf.make_tokenizer(tokenizer_json(), 297, [{"eos_token_id": [EOT_ID, 3]}], d)
    out = tmp_path / "bundle"
    out.mkdir()
    entry, written = tf.write_bundle_files(tok, out, "tokenizer.json")
    assert written == ["tokenizer.json", "chat_template.jinja"]
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == CHATML
    assert entry == TokenizerEntry("tokenizer.json", 297, EOT_ID, EOT_ID, EOT_ID, (EOT_ID, 3), True,
                                   "chat_template.jinja", {"eos_token": EOT})


# ------------------------------------------------------------------------------- the manifest


def _manifest_dict() -> dict:
    return json.loads((made("small").bundle / MANIFEST).read_text())


def test_an_old_manifest_without_the_new_fields_loads_with_defaults():
    d = _manifest_dict()
    d["tokenizer"] = {k: d["tokenizer"][k] for k in ("file", "vocab_size", "eos_token_id", "bos_token_id", "pad_token_id")}
    t = Manifest.from_dict(d).tokenizer
    assert (t.eos_token_ids, t.add_bos_token, t.chat_template, t.special_tokens) == ((), False, None, {})
    assert t.stop_ids == (EOT_ID,)


def test_the_new_fields_round_trip():
    d = _manifest_dict()
    d["tokenizer"] |= {"eos_token_ids": [EOT_ID, 4], "add_bos_token": True, "chat_template": "chat_template.jinja",
                       "special_tokens": {"bos_token": EOT}}
    m = Manifest.from_dict(d)
    assert m.tokenizer.stop_ids == (EOT_ID, 4)
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))).tokenizer == m.tokenizer


@pytest.mark.parametrize(("field", "value", "match"), [
    ("eos_token_ids", 3, "must be a list"),
    ("eos_token_ids", [1, "2"], "eos_token_ids"),
    ("add_bos_token", "yes", "add_bos_token must be true or false"),
    ("chat_template", 5, "chat_template must be a file name"),
    ("special_tokens", {"bos_token": 1}, "special_tokens must map"),
])
def test_bad_new_fields_are_bundle_errors(field, value, match):
    d = _manifest_dict()
    d["tokenizer"][field] = value
    with pytest.raises(BundleError, match=match):
        Manifest.from_dict(d)


# ---------------------------------------------------------------------- the runtime tokenizer


def _raw_tokenizer():
    from tokenizers import Tokenizer as Raw

    return Raw.from_str(tokenizer_json())


def _runtime(text: str, **entry) -> Tokenizer:
    from tokenizers import Tokenizer as Raw

    return Tokenizer(Raw.from_str(text), TokenizerEntry("tokenizer.json", 297, EOT_ID, EOT_ID, EOT_ID, **entry))


def test_encode_prepends_bos_when_the_manifest_says_and_never_twice():
    plain = _runtime(tokenizer_json()).encode("hi")
    tok = _runtime(tokenizer_json(), add_bos_token=True)
    assert tok.encode("hi") == [EOT_ID, *plain] and tok.adds_bos
    assert tok.encode(EOT + "hi") == [EOT_ID, *plain]  # the text's own BOS is the one
    assert tok.encode("hi", add_special_tokens=False) == plain
    assert _runtime(tokenizer_json()).encode("hi") == plain and not _runtime(tokenizer_json()).adds_bos


def test_a_post_processor_bos_is_not_doubled_and_is_seen_by_adds_bos():
    tok = _runtime(_bos_first_json(), add_bos_token=False)
    plain = tok.encode("hi", add_special_tokens=False)
    assert tok.encode("hi") == [EOT_ID, *plain] and tok.adds_bos


def _bundle_with(tmp_path: Path, **fields) -> Path:
    b = Path(shutil.copytree(made("small").bundle, tmp_path / "b"))
    d = json.loads((b / MANIFEST).read_text())
    d["tokenizer"] |= fields
    (b / MANIFEST).write_text(json.dumps(d))
    return b


def test_generation_stops_on_any_eos_id(tmp_path):
    from tests.test_generate import ScriptedRuntime

    b = _bundle_with(tmp_path, eos_token_ids=[EOT_ID, 40, 41])
    bundle = Bundle.load(b)
    tok = Tokenizer.from_bundle(bundle)
    body = tok.encode("ab")
    gen = Generator(ScriptedRuntime(bundle, [body + [41, 5, 6], body + [40, 7], body + [EOT_ID], body + [8] * 9]), tok, bundle)
    out = gen.generate(["w", "x", "y", "z"], max_new_tokens=6)
    assert [r.finish_reason for r in out] == ["eos", "eos", "eos", "length"]
    assert [r.token_ids[-1] for r in out[:3]] == [41, 40, EOT_ID] and out[0].text == "ab"
    gen.runtime.scripts = [body + [41, 5, 6]]
    pieces = list(gen.stream("w", max_new_tokens=6))
    assert "".join(pieces) == "ab"
    # Clearing the primary EOS clears them all (what a benchmark does to decode every token).
    no_eos = Tokenizer(tok._tok, replace(tok.entry, eos_token_id=None))
    assert no_eos.eos_token_ids == ()


def test_generate_prepends_bos_once_when_the_bundle_says_so(tmp_path):
    b = _bundle_with(tmp_path, add_bos_token=True)
    with Generator.load(b, threads=1) as gen:
        out = gen.generate("hi", max_new_tokens=2)
        again = gen.generate(EOT + "hi", max_new_tokens=2)
    assert out.prompt_token_ids[0] == EOT_ID and out.prompt_token_ids[1] != EOT_ID
    assert again.prompt_token_ids == out.prompt_token_ids
