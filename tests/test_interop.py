"""Bundles load in other runtimes as they are: export writes config.json, generation_config.json
and genai_config.json beside the graph (exporters/interop.py), so that Optimum's
ORTModelForCausalLM and onnxruntime-genai generate the same greedy tokens as gptdeploy.

The checks against Optimum and onnxruntime-genai run in their own interpreters (Optimum pins
transformers < 4.58; genai needs neither torch nor gptdeploy), named by environment variables:

    python3 -m venv /work/venvs/optimum && /work/venvs/optimum/bin/pip install torch==2.13.0 \\
        && /work/venvs/optimum/bin/pip install "optimum[onnxruntime]"
    python3 -m venv /work/venvs/genai && /work/venvs/genai/bin/pip install onnxruntime-genai numpy
    GPTDEPLOY_OPTIMUM_PYTHON=/work/venvs/optimum/bin/python \\
    GPTDEPLOY_GENAI_PYTHON=/work/venvs/genai/bin/python pytest tests/test_interop.py

Without them those tests skip and say how to enable them. The rest runs everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from gptdeploy import contract as io
from gptdeploy.bundle import Bundle
from gptdeploy.config import GPTConfig, Rope
from gptdeploy.exporters.interop import genai_config, generation_config, gpt2_config
from gptdeploy.manifest import TokenizerEntry

ROOT = Path(__file__).resolve().parent.parent
INTEROP_FILES = ("config.json", "generation_config.json", "genai_config.json")

OPTIMUM_ENV, GENAI_ENV = "GPTDEPLOY_OPTIMUM_PYTHON", "GPTDEPLOY_GENAI_PYTHON"
OPTIMUM_HOW = (f"set {OPTIMUM_ENV} to a Python with Optimum: python3 -m venv V && V/bin/pip install "
               "torch==2.13.0 && V/bin/pip install 'optimum[onnxruntime]' (see this file's docstring)")
GENAI_HOW = (f"set {GENAI_ENV} to a Python with onnxruntime-genai: python3 -m venv V && "
             "V/bin/pip install onnxruntime-genai numpy (see this file's docstring)")

# Each prints the greedy continuation of argv[2] (JSON ids), at most argv[3] tokens, as JSON on its
# last line, from the bundle at argv[1] and nothing but the bundle's own files.
OPTIMUM_SCRIPT = """
import json, sys
import torch
from optimum.onnxruntime import ORTModelForCausalLM
bundle, ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = ORTModelForCausalLM.from_pretrained(bundle)  # model.onnx + config.json + generation_config.json
x = torch.tensor([ids])
out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
print(json.dumps(out[0, len(ids):].tolist()))
"""
GENAI_SCRIPT = """
import json, sys
import onnxruntime_genai as og
bundle, ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = og.Model(bundle)  # genai_config.json
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=len(ids) + n)
generator = og.Generator(model, params)
generator.append_tokens(ids)
out = []
while not generator.is_done():
    generator.generate_next_token()
    out.append(int(generator.get_next_tokens()[0]))
print(json.dumps(out))
"""


def _tok(**kw) -> TokenizerEntry:
    return TokenizerEntry(**{"file": "tokenizer.json", "vocab_size": 300, **kw})


# ------------------------------------------------------------------ what export writes (no extras)


def _interop(bundle: Bundle) -> dict:
    return bundle.manifest.source["interop"]


@pytest.mark.slow
def test_an_hf_bundle_carries_the_source_configs_and_a_genai_config(tmp_path):
    from gptdeploy.exporters import export_bundle
    from tests.factories import make_hf_gpt2_dir

    src = make_hf_gpt2_dir(tmp_path / "src", n_layer=1, n_head=2, n_embd=16, n_positions=32)
    b = export_bundle(src, tmp_path / "b").bundle  # Bundle.load checks every listed SHA-256
    m = b.manifest
    assert set(INTEROP_FILES) <= set(m.files)
    for name in ("config.json", "generation_config.json"):
        assert (b.path / name).read_bytes() == (src / name).read_bytes()
        assert _interop(b)[name] == "copied from the source"
    genai = json.loads((b.path / "genai_config.json").read_text())
    model, dec = genai["model"], genai["model"]["decoder"]
    assert model["type"] == "decoder" and "stacked past" in _interop(b)["genai_config.json"]
    assert (model["vocab_size"], model["context_length"], model["eos_token_id"]) == (m.config.vocab_size, 32,
                                                                                     list(m.tokenizer.stop_ids))
    assert (dec["filename"], dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == (
        "model.onnx", 1, 2, 8)
    assert dec["inputs"]["past_key_names"] % 0 == io.past_key(0)
    assert dec["outputs"]["present_value_names"] % 3 == io.present_value(3)
    assert genai["search"]["past_present_share_buffer"] is False


@pytest.mark.slow
def test_a_llama_bundle_gets_genai_type_llama_and_declares_last_position_logits(tmp_path):
    import onnx

    from gptdeploy.exporters import export_bundle
    from tests.factories import make_hf_dir

    b = export_bundle(make_hf_dir(tmp_path / "src", "llama", n_layer=1), tmp_path / "b").bundle
    genai = json.loads((b.path / "genai_config.json").read_text())["model"]
    assert genai["type"] == "llama" and _interop(b)["genai_config.json"] == "written: model type 'llama'"
    assert (genai["decoder"]["num_attention_heads"], genai["decoder"]["num_key_value_heads"]) == (6, 2)
    graph = onnx.load(str(b.path / "model.onnx"), load_external_data=False)
    dims = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in graph.graph.output}
    # onnxruntime-genai reads a fixed 1 as "last-position logits" (Model::IsPruned)
    assert dims[io.LOGITS] == [io.BATCH, 1, b.manifest.config.vocab_size]
    assert dims[io.present_key(0)] == [io.BATCH, 2, io.TOTAL, 8]


@pytest.mark.slow
def test_nanogpt_gets_a_gpt2_config_that_transformers_runs_as_the_same_model(tmp_path):
    """The written config.json describes the canonical model: transformers' GPT2LMHeadModel built
    from it, with the checkpoint's weights (zero biases where nanoGPT has none), gives the graph's logits."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoConfig, GPT2LMHeadModel

    from gptdeploy.exporters import export_bundle
    from tests.factories import make_nanogpt_ckpt

    ckpt = make_nanogpt_ckpt(tmp_path / "nano", bias=False)
    b = export_bundle(ckpt, tmp_path / "b").bundle
    assert "zero" in _interop(b)["config.json"] and _interop(b)["generation_config.json"].startswith("written")
    config = AutoConfig.from_pretrained(b.path)
    assert (config.model_type, config.n_layer, config.n_head, config.n_embd, config.activation_function) == (
        "gpt2", 2, 2, 32, "gelu")
    hf = GPT2LMHeadModel(config).eval()
    nano = torch.load(ckpt, weights_only=True)["model"]
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {k: v.t() if k.endswith(conv1d) else v for k, v in nano.items()}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(".bias") for k in missing), (missing, unexpected)
    ids = [[3, 1, 4, 1, 5, 9, 2, 6]]
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits[0, -1].numpy()
    session = ort.InferenceSession(str(b.path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {io.INPUT_IDS: np.array(ids), io.ATTENTION_MASK: np.ones((1, 8), np.int64),
             io.POSITION_IDS: np.arange(8)[None]}
    for name in b.manifest.graphs["fp32"].signature.past_names():
        feeds[name] = np.zeros((1, 2, 0, 16), np.float32)
    got = session.run([io.LOGITS], feeds)[0][0, -1]
    assert np.abs(got - want).max() < 1e-4


def test_what_gpt2_and_genai_cannot_describe_is_skipped_with_the_reason():
    llama = GPTConfig(n_layer=1, n_head=4, n_embd=32, vocab_size=64, block_size=16, n_kv_head=2, norm="rmsnorm",
                      mlp="swiglu", rope=Rope(), family="llama", tie_word_embeddings=False)
    why = gpt2_config(llama, _tok())
    assert why == ("GPT-2 has no rmsnorm norms, a swiglu MLP, rotary positions, an untied head, "
                   "grouped-query attention")
    from gptdeploy.contract import GraphSignature

    other = GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=64, block_size=16, family="falcon")
    config, note = genai_config(other, _tok(), "model.onnx", GraphSignature.for_config(other))
    assert config is None and note == "skipped: onnxruntime-genai has no model type for family 'falcon'"


def test_generation_config_gets_the_ids_gptdeploy_stops_on(tmp_path):
    """Optimum's generate stops on generation_config's EOS ids: where the bundle stops on more (a
    tokenizer_config eos_token, config.json's eos), the copy lists them all and the note says so."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5, "temperature": 0.7}))
    source = SimpleNamespace(path=tmp_path, description={"files": {"generation_config.json": "x"}})
    text, note = generation_config(source, _tok(eos_token_id=7, eos_token_ids=(7, 5)))
    assert json.loads(text) == {"eos_token_id": [7, 5], "temperature": 0.7}
    assert note == "copied from the source, eos_token_id [5] -> [7, 5] (the ids gptdeploy stops on)"
    text, note = generation_config(source, _tok(eos_token_id=5, eos_token_ids=(5,)))
    assert text == (tmp_path / "generation_config.json").read_text() and note == "copied from the source"
    text, note = generation_config(SimpleNamespace(path=tmp_path, description={}), _tok(eos_token_id=0, bos_token_id=0))
    assert json.loads(text) == {"bos_token_id": 0, "eos_token_id": [0]} and "source has none" in note


# ------------------------------------------------------- Optimum and onnxruntime-genai (extras)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """name -> (bundle path, prompt ids, new tokens), exported on first use (only the extras need them)."""
    from gptdeploy.exporters import export_bundle
    from gptdeploy.tokenizer import Tokenizer

    root, made = tmp_path_factory.mktemp("interop"), {}

    def get(name: str):
        if name not in made:
            if name == "tiny-gpt":
                path = export_bundle(ROOT / "samples" / "tiny-gpt", root / name).bundle.path
                text, n = "Once upon a time, there was a", 24
            elif name == "tiny-llama":  # a chat turn: its answer ends with <|im_end|>, one of two EOS ids
                path = export_bundle(ROOT / "samples" / "tiny-llama", root / name).bundle.path
                text, n = "<|endoftext|><|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n", 24
            else:  # a family without a genai type of its own, and a nanoGPT with a written config.json
                from tests.factories import make_hf_dir, make_nanogpt_ckpt

                src = make_hf_dir(root / f"{name}-src", "gpt_neox") if name == "gpt_neox" else \
                    make_nanogpt_ckpt(root / f"{name}-src", bias=False)
                path = export_bundle(src, root / name).bundle.path
                text, n = "", 16
            tok = Tokenizer.from_bundle(Bundle.load(path))
            ids = tok.encode(text, add_special_tokens=False) if text else [5, 6, 7, 8]
            made[name] = (path, ids, n)
        return made[name]

    return get


def _gptdeploy_tokens(path: Path, ids: list[int], n: int) -> list[int]:
    from gptdeploy.generate import Generator

    with Generator.load(path, threads=1) as gen:
        return gen.generate_ids([ids], max_new_tokens=n)[0].token_ids


def _run(python: str, script: str, path: Path, ids: list[int], n: int) -> list[int]:
    done = subprocess.run([python, "-c", script, str(path), json.dumps(ids), str(n)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _python(env: str, how: str) -> str:
    python = os.environ.get(env)
    if not python:
        pytest.skip(how)
    return python


def _generates_what_gptdeploy_generates(bundles, name: str, env: str, how: str, script: str) -> None:
    """The runtime behind `env` (skipped with `how` where unset) generates gptdeploy's greedy tokens."""
    python = _python(env, how)
    path, ids, n = bundles(name)
    want = _gptdeploy_tokens(path, ids, n)
    assert _run(python, script, path, ids, n) == want
    if name == "tiny-llama":
        assert want[-1] == 2 and len(want) < n  # both ended the turn with <|im_end|>


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-llama", "nanogpt"])
def test_optimum_generates_what_gptdeploy_generates(bundles, name):
    _generates_what_gptdeploy_generates(bundles, name, OPTIMUM_ENV, OPTIMUM_HOW, OPTIMUM_SCRIPT)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-llama", "gpt_neox", "nanogpt"])
def test_onnxruntime_genai_generates_what_gptdeploy_generates(bundles, name):
    _generates_what_gptdeploy_generates(bundles, name, GENAI_ENV, GENAI_HOW, GENAI_SCRIPT)
