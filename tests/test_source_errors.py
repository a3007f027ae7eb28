"""Every bad source is one SourceError whose message says what is wrong and what to do."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptdeploy.errors import SourceError
from gptdeploy.exporters.sources import load_source
from tests.factories import make_hf_gpt2_dir, make_nanogpt_ckpt

GARBAGE = bytes(range(7, 256)) * 40  # fixed, so no run can stumble on a valid header


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    return d


def load_error(path, **kw) -> str:
    with pytest.raises(SourceError) as info:
        load_source(path, **kw)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_missing_path(tmp_path):
    assert "does not exist" in load_error(tmp_path / "nope")


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "empty directory" in load_error(tmp_path / "empty")


def test_unrecognised_lists_every_format(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    message = load_error(tmp_path / "x")
    assert "not a supported source" in message
    assert all(k in message for k in ("sample:", "hf-gpt2:", "nanogpt:", "config.json", "ckpt.pt"))


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_other_architectures(tmp_path, arch):
    d = tmp_path / arch
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"model_type": arch, "architectures": [f"{arch.title()}Model"]})
    )
    message = load_error(d)
    assert f"architecture '{arch}'" in message and "not supported" in message
    assert "supported: gpt2" in message


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"scale_attn_weights": False}, "scale_attn_weights=false"),
        ({"add_cross_attention": True}, "add_cross_attention=true"),
        ({"tie_word_embeddings": False}, "untied lm_head"),
        ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
        ({"n_embd": 48}, "do not match its config"),
        ({"n_layer": 3}, "missing h.2."),
        ({"n_head": 5}, "not divisible by n_head 5"),
    ],
)
def test_config_refusals(tmp_path, changes, expected):
    d = edit_config(make_hf_gpt2_dir(tmp_path / "hf"), **changes)
    assert expected in load_error(d)


def test_untied_lm_head_weights(tmp_path):
    d = make_hf_gpt2_dir(tmp_path / "hf")
    state = load_file(d / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1.0
    save_file(state, d / "model.safetensors")
    assert "untied lm_head is not supported" in load_error(d)


def test_config_json_not_json(tmp_path):
    d = make_hf_gpt2_dir(tmp_path / "hf")
    (d / "config.json").write_text("{not json")
    message = load_error(d)
    assert "config.json" in message and "not readable JSON" in message


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_bad_safetensors(tmp_path, damage):
    d = make_hf_gpt2_dir(tmp_path / "hf")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] if damage == "truncate" else GARBAGE)
    message = load_error(d)
    assert "model.safetensors" in message and "truncated or not a safetensors file" in message


def test_bad_pytorch_bin(tmp_path):
    d = make_hf_gpt2_dir(tmp_path / "hf", weights="bin")
    (d / "pytorch_model.bin").write_bytes(GARBAGE)
    assert "pytorch_model.bin is truncated, corrupt" in load_error(d)


def test_missing_weights(tmp_path):
    d = make_hf_gpt2_dir(tmp_path / "hf")
    (d / "model.safetensors").unlink()
    assert "has no weights: expected model.safetensors or pytorch_model.bin" in load_error(d)


def test_missing_tokenizer(tmp_path):
    message = load_error(make_hf_gpt2_dir(tmp_path / "hf", tokenizer=None))
    assert "has no tokenizer" in message and "tokenizer.json" in message and "--tokenizer" in message


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_bad_ckpt(tmp_path, damage):
    ckpt = make_nanogpt_ckpt(tmp_path / "out")
    data = ckpt.read_bytes()
    ckpt.write_bytes({"truncate": data[: len(data) // 2], "garbage": GARBAGE, "empty": b""}[damage])
    message = load_error(ckpt)
    assert "ckpt.pt is truncated, corrupt or not a PyTorch checkpoint" in message


def test_ckpt_with_code_objects_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = make_nanogpt_ckpt(tmp_path / "out")
    data = torch.load(ckpt, weights_only=True)
    data["evil"] = _Evil(marker)
    torch.save(data, ckpt)
    message = load_error(ckpt.parent)
    assert "contains objects that are not allowed" in message and "system" in message
    assert not marker.exists()


def test_ckpt_not_from_train_py(tmp_path):
    (tmp_path / "ckpt.pt").parent.mkdir(exist_ok=True)
    torch.save({"wte.weight": torch.zeros(3, 4)}, tmp_path / "ckpt.pt")
    assert "not a nanoGPT train.py checkpoint" in load_error(tmp_path / "ckpt.pt")


def test_ckpt_weights_not_matching_model_args(tmp_path):
    ckpt = make_nanogpt_ckpt(tmp_path / "out")
    data = torch.load(ckpt, weights_only=True)
    data["model_args"]["n_embd"] = 64
    torch.save(data, ckpt)
    message = load_error(ckpt)
    assert "do not match its config" in message and "model_args" in message


def test_malicious_meta_pkl_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = make_nanogpt_ckpt(tmp_path / "out")
    (ckpt.parent / "meta.pkl").write_bytes(pickle.dumps({"stoi": {"a": 0}, "x": _Evil(marker)}))
    message = load_error(ckpt)
    assert "meta.pkl" in message and "refused: it references" in message
    assert ("posix.system" in message or "nt.system" in message) and "could execute code" in message
    assert not marker.exists()


def test_meta_pkl_without_stoi(tmp_path):
    ckpt = make_nanogpt_ckpt(tmp_path / "out")
    (ckpt.parent / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 50257}))
    assert "no character vocabulary (stoi)" in load_error(ckpt)


def test_nanogpt_without_meta_or_tokenizer(tmp_path):
    message = load_error(make_nanogpt_ckpt(tmp_path / "out", meta=False))
    assert "GPT-2 BPE" in message and "cannot be downloaded" in message and "--tokenizer" in message


def test_tokenizer_larger_than_model(tmp_path):
    ckpt = make_nanogpt_ckpt(tmp_path / "out", vocab_size=40)  # the meta vocabulary has more characters
    assert "but the model's embedding has only 40 rows" in load_error(ckpt)


def test_bad_tokenizer_argument(tmp_path):
    ckpt = make_nanogpt_ckpt(tmp_path / "out", meta=False)
    (tmp_path / "t").mkdir()
    assert "neither a tokenizer.json file" in load_error(ckpt, tokenizer=tmp_path / "t")
    (tmp_path / "t" / "tokenizer.json").write_text("{}")
    assert "not a valid tokenizers JSON" in load_error(ckpt, tokenizer=tmp_path / "t")
    assert "does not exist" in load_error(ckpt, tokenizer=tmp_path / "missing.json")
