"""An HF source's tokenizer settings files: recorded with their SHA-256 among the source's files in
the manifest description, and read from `--tokenizer DIR` when one is given (they belong to that
tokenizer), from the model directory otherwise (exporters/sources/hf.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gptdeploy.exporters.sources import load_source
from gptdeploy.hashing import sha256_file
from tests.factories import make_hf_gpt2_dir, tokenizer_json

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "tiny-llama"
MODEL_TEMPLATE = "{% for m in messages %}model: {{ m.content }}{% endfor %}"
TOK_TEMPLATE = "{% for m in messages %}tok: {{ m.content }}{% endfor %}"
JINJA_TEMPLATE = "{% for m in messages %}jinja: {{ m.content }}{% endfor %}"


def test_the_samples_settings_files_are_described_with_their_sha256():
    source = load_source(SAMPLE)
    read = source.description["files"]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "sample.json"):
        assert read[name] == sha256_file(SAMPLE / name), name
    assert source.tokenizer.chat_template == json.loads((SAMPLE / "tokenizer_config.json").read_text())["chat_template"]


def _model_dir(tmp_path: Path) -> Path:
    """A GPT-2 directory whose own tokenizer_config.json names a template and an eos token."""
    d = make_hf_gpt2_dir(tmp_path / "model", n_layer=1, n_head=2, n_embd=16, n_positions=32)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": MODEL_TEMPLATE, "eos_token": "."}))
    return d


def test_tokenizer_dir_settings_replace_the_model_directorys(tmp_path):
    model = _model_dir(tmp_path)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    (tok / "tokenizer_config.json").write_text(json.dumps({"chat_template": TOK_TEMPLATE, "bos_token": "a"}))
    (tok / "special_tokens_map.json").write_text(json.dumps({"pad_token": "b"}))
    (tok / "chat_template.jinja").write_text(JINJA_TEMPLATE, encoding="utf-8")  # wins over tokenizer_config's
    source = load_source(model, tokenizer=tok)
    t = source.tokenizer
    assert t.chat_template == JINJA_TEMPLATE
    assert t.special_tokens == {"bos_token": "a", "pad_token": "b"}  # no "." eos from the model directory
    assert [p.name for p in t.settings_files] == ["special_tokens_map.json", "tokenizer_config.json",
                                                  "chat_template.jinja"]
    read = source.description["files"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert read[f"../tok/{name}"] == sha256_file(tok / name), name
    assert "tokenizer_config.json" not in read  # the model directory's own was not used
    assert read["config.json"] == sha256_file(model / "config.json")
    assert read["generation_config.json"] == sha256_file(model / "generation_config.json")


def test_a_tokenizer_file_keeps_the_model_directorys_settings(tmp_path):
    model = _model_dir(tmp_path)
    other = tmp_path / "other.json"
    shutil.copy(model / "tokenizer.json", other)
    source = load_source(model, tokenizer=other)
    assert source.tokenizer.chat_template == MODEL_TEMPLATE and source.tokenizer.special_tokens == {"eos_token": "."}
    read = source.description["files"]
    assert read["../other.json"] == sha256_file(other)
    assert read["tokenizer_config.json"] == sha256_file(model / "tokenizer_config.json")
