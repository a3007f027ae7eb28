"""Every family through the same verified path, against transformers' own eager forward: the
loaded source (canonical module vs transformers), the exported bundle (parity with the fp32
tolerances of GPT-2, stored in the manifest) and greedy generation through the runtimes.

Tiny random models made by transformers itself (tests/factories.py), on shapes chosen to break
assumptions: GQA 3:1 and MQA, head_dim != hidden / heads, a window shorter than the prompts,
tied and untied heads, linear and llama3 rope scaling, biases, partial rotary, parallel residual,
bf16 and sharded checkpoints.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from gptdeploy.exporters.export import export_bundle
from gptdeploy.exporters.sources import load_source
from gptdeploy.modeling import GPT, load_state
from tests.factories import make_hf_dir
from tests.test_export import _assert_passed
from tests.test_sources import TOL, assert_parity, left_padded, positions

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500.0}
LINEAR = {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}
CASES = {  # name: (model_type, factory arguments)
    "llama-gqa3-untied": ("llama", {}),
    "llama-mqa-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-head-dim-12": ("llama", dict(head_dim=12)),  # 48 / 6 = 8
    "llama-rope-linear": ("llama", dict(rope_parameters=LINEAR)),
    "llama-rope-llama3": ("llama", dict(rope_parameters=LLAMA3)),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-bf16": ("llama", dict(dtype="bfloat16")),
    "mistral-window-5-mqa": ("mistral", {}),
    "mistral-no-window": ("mistral", dict(sliding_window=None)),
    "qwen2-tied-biases": ("qwen2", {}),
    "qwen2-window-late-layers": ("qwen2", dict(n_layer=3, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen2-sharded": ("qwen2", dict(max_shard_size="20KB")),
    "qwen3-head-dim-12": ("qwen3", {}),
    "qwen3-biases-untied": ("qwen3", dict(attention_bias=True, tie_word_embeddings=False)),
    "gpt_neox-parallel": ("gpt_neox", {}),
    "gpt_neox-sequential-half-rotary": ("gpt_neox", dict(use_parallel_residual=False, rotary_pct=0.5,
                                                          hidden_act="gelu_new", attention_bias=False)),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Each case's directory, made once for the module (transformers' save takes ~0.3 s)."""
    root, dirs = tmp_path_factory.mktemp("families"), {}

    def get(case: str):
        if case not in dirs:
            family, kw = CASES[case]
            dirs[case] = make_hf_dir(root / case, family, **kw)
        return dirs[case]

    return get


@pytest.mark.parametrize("case", CASES)
def test_canonical_module_matches_transformers(made, case, one_torch_thread):
    src = load_source(made(case))
    assert src.kind == f"hf-{CASES[case][0]}" and src.config.family == CASES[case][0]
    assert all(v.dtype == torch.float32 for v in src.state.values())
    assert src.reference().name.startswith("transformers ")
    assert_parity(src, lengths=(9, 6, 2))  # longer than the windows; left padding


def test_descriptions_map_the_switches(made):
    c = {case: load_source(made(case)).config for case in (
        "llama-gqa3-untied", "llama-rope-llama3", "mistral-window-5-mqa", "qwen2-window-late-layers",
        "qwen3-head-dim-12", "gpt_neox-parallel", "qwen2-sharded")}
    llama = c["llama-gqa3-untied"]
    assert (llama.norm, llama.mlp, llama.kv_heads, llama.head_dim) == ("rmsnorm", "swiglu", 2, 8)
    assert not llama.tie_word_embeddings and not (llama.qkv_bias or llama.mlp_bias or llama.norm_bias)
    rope = c["llama-rope-llama3"].rope
    assert (rope.scaling, rope.factor, rope.original_max_positions, rope.theta) == ("llama3", 8.0, 16, 500.0)
    assert (c["mistral-window-5-mqa"].sliding_window, c["mistral-window-5-mqa"].window_layers) == (5, None)
    qwen2 = c["qwen2-window-late-layers"]
    assert qwen2.window_layers == (1, 2) and [qwen2.windowed(i) for i in range(3)] == [False, True, True]
    assert qwen2.qkv_bias and not qwen2.attn_proj_bias and c["qwen2-sharded"].tie_word_embeddings
    qwen3 = c["qwen3-head-dim-12"]
    assert qwen3.qk_norm and qwen3.head_dim == 12 and qwen3.n_embd == 32
    neox = c["gpt_neox-parallel"]
    assert neox.parallel_residual and neox.norm == "layernorm" and neox.rotary_dim == 4  # 16 * 0.25
    assert neox.gelu == "exact" and not neox.tie_word_embeddings


def test_transformers_4_config_names_are_read(made, tmp_path, one_torch_thread):
    """Configs written before transformers 5: `rope_scaling` {"type": ...} and a top-level
    `rope_theta`; GPT-NeoX's `rotary_pct` and `rotary_emb_base`. Read as transformers reads them."""
    import shutil

    d = shutil.copytree(made("llama-rope-linear"), tmp_path / "llama")
    _rewrite(d, rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=500.0)
    assert load_source(d).config.rope == load_source(made("llama-rope-linear")).config.rope
    assert_parity(load_source(d))
    neox = make_hf_dir(tmp_path / "neox", "gpt_neox", rotary_pct=0.5, rotary_emb_base=300.0)
    _rewrite(neox, rotary_pct=0.5, rotary_emb_base=300)
    src = load_source(neox)
    assert (src.config.rope.dim, src.config.rope.theta) == (8, 300.0)
    assert_parity(src)


def _rewrite(d, **legacy):
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters")
    (d / "config.json").write_text(json.dumps(cfg | legacy))


def test_parity_tells_the_switches_apart(made, one_torch_thread):
    """Guards the factories' scales: a model missing one switch is measurably off the reference."""
    wrong = {
        "mistral-window-5-mqa": dict(sliding_window=None),
        "llama-rope-llama3": dict(rope=dataclasses.replace(load_source(made("llama-rope-llama3")).config.rope,
                                                           scaling="default")),
        "gpt_neox-parallel": dict(parallel_residual=False),
        "qwen3-head-dim-12": dict(qk_norm=False),
    }
    ids, mask = left_padded(297, [9, 6])
    for case, change in wrong.items():
        src = load_source(made(case))
        state = dict(src.state)
        if change.get("qk_norm") is False:
            state = {k: v for k, v in state.items() if not k.endswith(("q_norm.weight", "k_norm.weight"))}
        model = GPT(dataclasses.replace(src.config, **change)).eval()
        load_state(model, state)
        with torch.no_grad():
            logits = model(ids, mask, positions(mask), model.empty_past(2))[0]
        ref = src.reference()(ids, mask, positions(mask))
        assert (ref.logits - logits).abs()[mask.bool()].max() > 10 * TOL, case


def test_window_counts_each_rows_own_positions(made):
    """A left-padded row computes what it computes alone, with a prompt longer than the window."""
    src = load_source(made("qwen2-window-late-layers"))
    model = GPT(src.config).eval()
    load_state(model, src.state)
    ids, mask = left_padded(297, [11, 4])
    with torch.no_grad():
        batch = model(ids, mask, positions(mask), model.empty_past(2))[0]
        alone = model(ids[1:, 7:], mask[1:, 7:], positions(mask[1:, 7:]), model.empty_past(1))[0]
    assert (batch[1, 7:] - alone[0]).abs().max() <= TOL


EXPORTS = ["llama-rope-llama3", "mistral-window-5-mqa", "qwen2-window-late-layers", "qwen3-biases-untied",
           "gpt_neox-parallel", "llama-bf16"]


@pytest.mark.parametrize("case", EXPORTS)
def test_export_parity(made, case, tmp_path):
    """The exported graph against transformers: left-padded prefill, chained decode, 32 greedy steps."""
    result = export_bundle(made(case), tmp_path / "bundle")
    _assert_passed(result.parity)
    m = result.bundle.manifest
    assert m.parity["fp32"]["passed"] and m.source["kind"] == f"hf-{CASES[case][0]}"
    assert m.config == load_source(made(case)).config  # the manifest's description reads back whole
    if CASES[case][0] == "mistral":
        assert "each row alone" in result.parity.reference


@pytest.mark.slow
@pytest.mark.parametrize("case", ["qwen2-sharded", "gpt_neox-sequential-half-rotary", "llama-mqa-tied"])
def test_export_parity_more_shapes(made, case, tmp_path):
    _assert_passed(export_bundle(made(case), tmp_path / "bundle").parity)


def runtime_greedy(bundle, backend: str, prompts: list[list[int]], n: int = 32) -> list[list[int]]:
    """n greedy tokens per prompt through a runtime, the prompts left-padded into one batch."""
    from gptdeploy.runtimes.backends import open_runtime
    from gptdeploy.steps import Steps

    with open_runtime(bundle, backend) as rt:
        steps = Steps(rt, prompts, pad_id=0, room=n)
        out, chosen = steps.prefill(), []
        for _ in range(n):
            chosen.append(out.logits.argmax(-1))  # (B,)
            out = steps.decode(chosen[-1])
    return np.stack(chosen, axis=1).tolist()


def transformers_greedy(path, prompt: list[int], n: int = 32) -> list[int]:
    """transformers' own generate (its KV cache, its sliding-window cache), up to its first EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", ["mistral-window-5-mqa", pytest.param("llama-gqa3-untied", marks=pytest.mark.slow),
                                  pytest.param("gpt_neox-parallel", marks=pytest.mark.slow)])
def test_runtimes_generate_what_transformers_generates(made, case, tmp_path, one_torch_thread):
    """32 greedy tokens through the ort and torch runtimes (a batch: left padding, a cache far
    longer than Mistral's window of 5) == transformers' generate on each prompt alone."""
    bundle = export_bundle(made(case), tmp_path / "bundle", attentions=False).bundle
    prompts = [list(range(40, 52)), [5, 17, 42], [101]]
    want = [transformers_greedy(made(case), p) for p in prompts]
    for backend in ("ort", "torch"):
        got = runtime_greedy(bundle, backend, prompts)
        for g, w, p in zip(got, want, prompts):
            assert g[: len(w)] == w, (backend, p)


def test_a_sample_card_on_another_family(made, tmp_path):
    """The sample loader is family-agnostic: samples/tiny-llama is a Llama directory with a card."""
    import shutil

    d = shutil.copytree(made("qwen3-head-dim-12"), tmp_path / "tiny-qwen")
    card = {"format": "gptdeploy-sample", "name": "tiny-qwen"}
    (d / "sample.json").write_text(json.dumps(card))
    src = load_source(d)
    assert src.kind == "sample" and src.config.family == "qwen3" and src.description["sample"] == card
