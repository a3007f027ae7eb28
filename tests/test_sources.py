"""Source loaders against the source frameworks' own forwards: shapes, padding, tokenizers."""

from __future__ import annotations

import ast
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from gptdeploy.exporters.sources import load_source
from gptdeploy.modeling import GPT, load_state
from tests.factories import make_hf_gpt2_dir, make_nanogpt_ckpt, meta_vocab, tokenizer_json

TOL = 1e-5  # fp32, same math in another order: measured worst 7e-7; a wrong GELU kind gives 1e-4
TEXTS = ["Hello, world!\nThe fox 42 jumps.", "你好，世界。模型", "spaces   and\ttabs <|endoftext|> 🙂 émoji"]


def left_padded(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, S), left-padded to the longest row, and their mask (B, S)."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, S - n :] = torch.randint(0, vocab, (n,), generator=g)
        mask[b, S - n :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)  # (B, S): each row counts from its first real token


def assert_parity(source, lengths=(9, 6)) -> None:
    """gptdeploy.modeling.GPT on the loaded state == the source's reference, on a left-padded batch."""
    ids, mask = left_padded(source.tokenizer.vocab_size, list(lengths))
    pos = positions(mask)
    model = GPT(source.config).eval()
    load_state(model, source.state)
    with torch.no_grad():
        logits, presents, attentions = model(ids, mask, pos, model.empty_past(ids.shape[0]))
    ref = source.reference()(ids, mask, pos)
    real = mask.bool()  # (B, S): compare only real query rows; pad rows are don't-care
    assert ref.logits.shape == logits.shape
    assert (ref.logits - logits).abs()[real].max() <= TOL
    assert len(ref.keys) == len(ref.values) == len(ref.attentions) == source.config.n_layer
    for i in range(source.config.n_layer):
        assert ref.keys[i].shape == presents[i][0].shape
        # (B, nkv, S, hs) -> real positions only: a per-row reference has nothing at pad positions
        assert (ref.keys[i] - presents[i][0]).abs().transpose(1, 2)[real].max() <= TOL, f"layer {i} keys"
        assert (ref.values[i] - presents[i][1]).abs().transpose(1, 2)[real].max() <= TOL, f"layer {i} values"
        att_diff = (ref.attentions[i] - attentions[i]).abs().amax(dim=(1, 3))  # (B, S) per query row
        assert att_diff[real].max() <= TOL, f"layer {i} attentions"


HF_CASES = {
    "base": {},
    "one-head": dict(n_head=1, n_embd=16),
    "three-heads-odd-width": dict(n_head=3, n_embd=36, vocab_size=301),
    "four-heads-bin": dict(n_head=4, n_embd=32, weights="bin"),
    "vocab-merges": dict(tokenizer="vocab_merges", vocab_size=320),
    "inverse-layer-idx": dict(n_layer=3, scale_attn_by_inverse_layer_idx=True),
    "eps-1e-6": dict(layer_norm_epsilon=1e-6),
    "exact-gelu": dict(activation_function="gelu"),
    "n-inner-upcast": dict(n_inner=40, reorder_and_upcast_attn=True),
    "untied-head": dict(tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", HF_CASES.values(), ids=HF_CASES.keys())
def test_hf_gpt2_matches_transformers(tmp_path, case):
    src = load_source(make_hf_gpt2_dir(tmp_path / "hf", **case))
    assert src.kind == "hf-gpt2"
    c = src.config
    assert (c.n_head, c.n_embd) == (case.get("n_head", 2), case.get("n_embd", 32))
    assert c.vocab_size == case.get("vocab_size", src.tokenizer.vocab_size)
    assert c.gelu == ("exact" if case.get("activation_function") == "gelu" else "tanh")
    assert c.layer_norm_eps == case.get("layer_norm_epsilon", 1e-5)
    assert all(v.dtype == torch.float32 for v in src.state.values())
    assert ("lm_head.weight" in src.state) is (case.get("tie_word_embeddings") is False)
    assert src.reference().name.startswith("transformers ")
    assert_parity(src)


def test_parity_check_can_tell_gelu_kinds_apart(tmp_path):
    """Guards the factories' weight scale: with too-small weights a wrong GELU kind would pass."""
    import dataclasses

    src = load_source(make_nanogpt_ckpt(tmp_path / "out"))
    ids, mask = left_padded(src.tokenizer.vocab_size, [9, 6])
    wrong = GPT(dataclasses.replace(src.config, gelu="tanh")).eval()
    load_state(wrong, src.state)
    with torch.no_grad():
        logits = wrong(ids, mask, positions(mask), wrong.empty_past(2))[0]
    ref = src.reference()(ids, mask, positions(mask))
    assert (ref.logits - logits).abs()[mask.bool()].max() > 5 * TOL


def test_hf_legacy_bin_names_and_buffers(tmp_path):
    """Old GPT-2 .bin files: no transformer. prefix, attn.bias/masked_bias buffers, tied lm_head saved."""
    d = make_hf_gpt2_dir(tmp_path / "hf", weights="bin")
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    legacy = {k.removeprefix("transformer."): v for k, v in state.items()}
    for i in range(2):
        legacy[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        legacy[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    legacy["lm_head.weight"] = legacy["wte.weight"].clone()
    torch.save(legacy, d / "pytorch_model.bin")
    src = load_source(d)
    assert not any(k.endswith((".attn.bias", ".attn.masked_bias")) for k in src.state)
    assert torch.equal(src.state["h.0.attn.c_attn.weight"], legacy["h.0.attn.c_attn.weight"].t())


def test_hf_description_and_special_tokens(tmp_path):
    src = load_source(make_hf_gpt2_dir(tmp_path / "hf"))
    eot = Tokenizer.from_str(tokenizer_json()).token_to_id("<|endoftext|>")
    assert (src.tokenizer.eos_token_id, src.tokenizer.bos_token_id) == (eot, eot)
    d = src.description
    assert d["name"] == "hf" and set(d["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert len(d["sha256"]) == 64
    assert load_source(tmp_path / "hf").description == d  # deterministic


def test_out_of_range_special_ids_fall_back_to_endoftext(tmp_path, caplog):
    """Tiny models trained from GPT-2's config often keep eos 50256 with a few-hundred-token vocabulary."""
    src = load_source(make_hf_gpt2_dir(tmp_path / "hf", eos_token_id=50256, bos_token_id=50256))
    assert src.tokenizer.eos_token_id == src.tokenizer.bos_token_id == 296
    assert "ignoring eos_token_id=50256" in caplog.text


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("orig_mod", [False, True])
def test_nanogpt_matches_reference(tmp_path, bias, orig_mod):
    src = load_source(make_nanogpt_ckpt(tmp_path / "out", bias=bias, orig_mod=orig_mod, n_head=4, n_layer=3))
    assert src.kind == "nanogpt"
    assert (src.config.bias, src.config.gelu, src.config.layer_norm_eps) == (bias, "exact", 1e-5)
    assert not any(k.startswith(("_orig_mod.", "transformer.")) or k == "lm_head.weight" for k in src.state)
    assert src.description["training"]["dataset"] == "shakespeare_char"
    assert_parity(src)


def test_nanogpt_padded_vocab_with_bpe_tokenizer(tmp_path):
    hf = make_hf_gpt2_dir(tmp_path / "tok", tokenizer="vocab_merges")
    ckpt = make_nanogpt_ckpt(tmp_path / "out", vocab_size=320, meta=False)  # padded past the tokenizer
    for given in (hf, tmp_path / "tok.json"):
        (tmp_path / "tok.json").write_text(tokenizer_json(), encoding="utf-8")
        src = load_source(ckpt.parent, tokenizer=given)
        assert (src.config.vocab_size, src.tokenizer.vocab_size) == (320, 297)
        assert src.tokenizer.eos_token_id == 296
    assert_parity(src)


def test_nanogpt_reference_agrees_with_transformers(tmp_path):
    """The nanoGPT reference itself, checked against transformers on GPT-2 weights converted the way
    nanoGPT's GPT.from_pretrained converts them (exact GELU and eps 1e-5 on both sides)."""
    from safetensors.torch import load_file

    from gptdeploy.exporters.references import HFReference, NanoGPTReference

    d = make_hf_gpt2_dir(tmp_path / "hf", n_head=4, activation_function="gelu")
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    nano = {k: v.t() if k.endswith(conv1d) else v for k, v in load_file(d / "model.safetensors").items()}
    ids, mask = left_padded(297, [8, 5])
    a = NanoGPTReference(nano, n_head=4)(ids, mask, positions(mask))
    b = HFReference(d)(ids, mask, positions(mask))
    assert (a.logits - b.logits).abs()[mask.bool()].max() <= TOL
    assert max((x - y).abs().max() for x, y in zip(a.keys, b.keys, strict=True)) <= TOL


def test_references_module_is_independent_of_modeling():
    tree = ast.parse((Path(__file__).parents[1] / "exporters" / "references.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported and not any(m.startswith("gptdeploy.modeling") for m in imported)


def test_vocab_merges_encodes_like_tokenizer_json(tmp_path):
    src = load_source(make_hf_gpt2_dir(tmp_path / "hf", tokenizer="vocab_merges"))
    converted, original = Tokenizer.from_str(src.tokenizer.json), Tokenizer.from_str(tokenizer_json())
    assert src.tokenizer.vocab_size == original.get_vocab_size(with_added_tokens=True)
    for text in TEXTS:
        ids = converted.encode(text).ids
        assert ids == original.encode(text).ids
        assert converted.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_json_round_trips(tmp_path):
    tok = Tokenizer.from_str(load_source(make_hf_gpt2_dir(tmp_path / "hf")).tokenizer.json)
    for text in TEXTS:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_meta_char_tokenizer_round_trips(tmp_path):
    src = load_source(make_nanogpt_ckpt(tmp_path / "out"))
    tok, stoi = Tokenizer.from_str(src.tokenizer.json), meta_vocab()["stoi"]
    text = "Hello, world!\n  你好世界 (42): 我们学习模型?\n\n"
    ids = tok.encode(text).ids
    assert ids == [stoi[c] for c in text]
    assert tok.decode(ids) == text
    assert src.tokenizer.vocab_size == len(stoi) and src.tokenizer.eos_token_id is None


def test_meta_found_under_data_dataset(tmp_path):
    ckpt = make_nanogpt_ckpt(tmp_path / "out-shakespeare-char", meta=False)
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    with open(tmp_path / "data" / "shakespeare_char" / "meta.pkl", "wb") as f:
        pickle.dump(meta_vocab(), f)
    src = load_source(ckpt)
    assert "../data/shakespeare_char/meta.pkl" in src.description["files"]
    assert src.description["name"] == "out-shakespeare-char"


def test_sample_directory_wins_over_hf(tmp_path):
    d = make_hf_gpt2_dir(tmp_path / "sample")
    card = {"format": "gptdeploy-sample", "name": "tiny", "corpus": "samples/corpus"}
    (d / "sample.json").write_text(json.dumps(card))
    src = load_source(d)
    assert (
        src.kind == "sample"
        and src.description["sample"] == card
        and "sample.json" in src.description["files"]
    )
    (d / "sample.json").write_text(json.dumps({"format": "something-else"}))
    assert load_source(d).kind == "hf-gpt2"


def test_registry_import_is_torch_free():
    code = (
        "import sys; import gptdeploy.exporters.sources as s; "
        "assert 'torch' not in sys.modules; print(s.SUPPORTED)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert all(kind in out for kind in ("sample:", "hf:", "nanogpt:"))
