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
    assert all(k in message for k in ("sample:", "hf:", "nanogpt:", "config.json", "ckpt.pt", "llama, mistral"))


@pytest.mark.parametrize("arch", ["bert", "falcon"])
def test_other_architectures(tmp_path, arch):
    d = tmp_path / arch
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"model_type": arch, "architectures": [f"{arch.title()}Model"]})
    )
    message = load_error(d)
    assert f"architecture '{arch}' ({arch.title()}Model) is not supported" in message
    assert "supported: gpt2, gpt_neox, llama, mistral, qwen2, qwen3" in message


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"scale_attn_weights": False}, "scale_attn_weights=false"),
        ({"add_cross_attention": True}, "add_cross_attention=true"),
        ({"tie_word_embeddings": False}, "missing lm_head.weight"),  # untied, but no head saved
        ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
        ({"n_embd": 48}, "do not match its config"),
        ({"n_layer": 3}, "missing h.2."),
        ({"n_head": 5}, "not divisible by n_head 5"),
    ],
)
def test_config_refusals(tmp_path, changes, expected):
    d = edit_config(make_hf_gpt2_dir(tmp_path / "hf"), **changes)
    assert expected in load_error(d)


def test_tied_config_with_a_different_lm_head(tmp_path):
    """transformers would silently tie (ignore the saved head); gptdeploy says so instead of guessing."""
    d = make_hf_gpt2_dir(tmp_path / "hf")
    state = load_file(d / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1.0
    save_file(state, d / "model.safetensors")
    message = load_error(d)
    assert "lm_head.weight differs from the token embedding" in message
    assert "tie_word_embeddings=true" in message


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


# ----------------------------------------------------------------- other families (docs/bad-inputs.md)


def _family_dir(tmp_path, family="llama", **kw):
    from tests.factories import make_hf_dir

    return make_hf_dir(tmp_path / family, family, **kw)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
         "rope_type 'yarn' is not supported; supported: default, linear, llama3"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic' is not supported"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope_type 'llama3' needs low_freq_factor"),
        ({"rope_parameters": {"rope_type": "linear"}}, "rope_type 'linear' needs factor"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "rope parameters per layer type"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported for this family"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for llama; supported: silu"),
        ({"tie_word_embeddings": True}, "differs from the token embedding"),
        ({"num_key_value_heads": 4}, "n_head 6 is not divisible by n_kv_head 4"),
    ],
)
def test_family_config_refusals(tmp_path, changes, expected):
    assert expected in load_error(edit_config(_family_dir(tmp_path), **changes))


def test_qwen2_layer_types_must_name_every_layer(tmp_path):
    d = _family_dir(tmp_path, "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert "layer_types must list" in load_error(edit_config(d, layer_types=["full_attention", "chunked"]))


def test_neox_activation_refused(tmp_path):
    message = load_error(edit_config(_family_dir(tmp_path, "gpt_neox"), hidden_act="relu"))
    assert "hidden_act 'relu' is not supported for gpt_neox; supported: gelu_new" in message


def _sharded(tmp_path):
    d = _family_dir(tmp_path, "qwen2", max_shard_size="20KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    return d, index


def test_missing_shard(tmp_path):
    d, index = _sharded(tmp_path)
    shard = sorted(set(index["weight_map"].values()))[1]
    (d / shard).unlink()
    assert f"names shard '{shard}', which is missing from" in load_error(d)


@pytest.mark.parametrize("outside", ["../elsewhere.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_shard_index_pointing_outside_the_directory(tmp_path, outside):
    d, index = _sharded(tmp_path)
    index["weight_map"][next(iter(index["weight_map"]))] = outside
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert f"names shard {outside!r}, which is outside" in load_error(d)


def test_shard_index_without_weight_map_or_with_a_tensor_no_shard_holds(tmp_path):
    d, index = _sharded(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    assert "has no weight_map" in load_error(d)
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(index["weight_map"].values()))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "lists model.layers.9.mlp.up_proj.weight but no shard holds it" in load_error(d)


def test_fused_projection_with_a_part_missing(tmp_path):
    d = _family_dir(tmp_path)
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, d / "model.safetensors")
    message = load_error(d)
    assert "has layers.1.self_attn.q_proj.weight but not layers.1.self_attn.k_proj.weight" in message
