"""How the `ort` runtime opens its sessions (runtimes/ort_session.py): onnxruntime's CPU
GroupQueryAttention has a tiled ("flash") kernel and a materializing one, chosen by an environment
variable it reads when a session is created. The runtime picks the materializing one unless its
probabilities would be large over the model's whole context, told otherwise, or the user's
environment says; it must leave the environment as it found it, and both
kernels must compute the source framework's logits on a fused graph (left-padded batch, chunked
prefill, decode steps)."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

from gptdeploy.errors import ConfigError
from gptdeploy.exporters.export import export_bundle
from gptdeploy.exporters.references import HFReference
from gptdeploy.parity import TOLERANCES
from gptdeploy.runtimes import ort_session
from gptdeploy.runtimes.ort import OrtRuntime
from gptdeploy.steps import Steps, left_pad, positions
from tests.factories import make_hf_dir

ENV = ort_session.GQA_FLASH_ENV
PROMPTS = [list(range(3, 40)), [42, 43, 44], [7, 7, 3, 250, 9, 11, 13, 17, 19, 23, 29]]
STEPS = 8


@pytest.fixture
def seen(monkeypatch):
    """The variable's value at each session creation (None: unset), onnxruntime faked."""
    values: list[str | None] = []

    def fake_session(path, options, providers):
        values.append(os.environ.get(ENV))
        return "session"

    monkeypatch.setattr(ort_session.ort, "InferenceSession", fake_session)
    monkeypatch.delenv(ENV, raising=False)
    return values


def test_the_kernel_asked_for_and_the_environment_left_as_found(seen):
    assert ort_session.open_session("g.onnx", ort.SessionOptions()) == "session"
    ort_session.open_session("g.onnx", ort.SessionOptions(), flash_default=True)
    ort_session.open_session("g.onnx", ort.SessionOptions(), gqa_flash=True)
    ort_session.open_session("g.onnx", ort.SessionOptions(), gqa_flash=False, flash_default=True)
    assert seen == ["1", "0", "0", "1"]  # "1": onnxruntime's materializing kernel
    assert ENV not in os.environ


def test_the_tiled_kernel_where_the_whole_context_would_need_a_large_probabilities_buffer():
    needs = ort_session.needs_tiled_attention
    assert not needs(9, 2048, 256)  # SmolLM-135M in chunks of 256: 18 MiB per batch row
    assert not needs(12, 1024, 256)  # GPT-2-124M: 12 MiB
    assert needs(14, 32768, 256)  # a 32K-context Qwen2.5-0.5B: 448 MiB
    assert needs(9, 2048, None)  # SmolLM's whole context in one call: 144 MiB
    assert needs(9, 2048, 4096) == needs(9, 2048, None)  # a call never holds more than the context
    assert not needs(9, 1024, None)  # 36 MiB


def test_an_empty_setting_is_unset_and_one_onnxruntime_cannot_read_is_refused(seen, monkeypatch):
    monkeypatch.setenv(ENV, "")  # onnxruntime reads an empty value as unset: so does gptdeploy
    ort_session.open_session("g.onnx", ort.SessionOptions(), flash_default=True)
    assert seen == ["0"] and os.environ[ENV] == ""
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(ConfigError, match=f"{ENV}='yes'.* 1 .* 0 "):
        ort_session.open_session("g.onnx", ort.SessionOptions())
    assert os.environ[ENV] == "yes" and seen == ["0"]  # nothing opened, nothing changed
    monkeypatch.setenv(ENV, "true")  # onnxruntime's other spelling of 1
    ort_session.open_session("g.onnx", ort.SessionOptions())
    assert seen == ["0", "true"]


def test_a_users_setting_wins_over_the_default_and_survives_an_explicit_choice(seen, monkeypatch):
    monkeypatch.setenv(ENV, "0")  # the user wants the tiled kernel
    ort_session.open_session("g.onnx", ort.SessionOptions())
    ort_session.open_session("g.onnx", ort.SessionOptions(), gqa_flash=False)  # a measurement forcing it
    assert seen == ["0", "1"]
    assert os.environ[ENV] == "0"


def test_the_environment_is_restored_when_onnxruntime_refuses_the_graph(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)

    def refusing(path, options, providers):
        raise ort_session.ORT_ERRORS[0]("bad graph")

    monkeypatch.setattr(ort_session.ort, "InferenceSession", refusing)
    with pytest.raises(ort_session.ORT_ERRORS):
        ort_session.open_session("g.onnx", ort.SessionOptions())
    assert ENV not in os.environ


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """A GQA 3:1 Llama's fused graph without attention outputs (the graph the tiled kernel can
    serve: an audit graph's `qk_output` always takes the materializing one), and its source."""
    root = tmp_path_factory.mktemp("gqa-kernels")
    src = make_hf_dir(root / "src", "llama", seed=5, hidden_size=96, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=128)
    return src, export_bundle(src, root / "b", attentions=False).bundle


def test_the_runtime_chooses_by_its_models_context_unless_the_user_did(fused, monkeypatch):
    _, bundle = fused
    real, seen = ort_session.ort.InferenceSession, []

    def spy(path, options, providers):
        seen.append(os.environ.get(ENV))
        return real(path, options, providers=providers)

    monkeypatch.setattr(ort_session.ort, "InferenceSession", spy)
    monkeypatch.delenv(ENV, raising=False)
    OrtRuntime(bundle, bundle.graph(), threads=1).close()  # 128 positions: a small buffer
    monkeypatch.setattr(ort_session, "PROBS_BUDGET", 1024)  # as if the context were long
    OrtRuntime(bundle, bundle.graph(), threads=1).close()
    monkeypatch.setenv(ENV, "1")  # the user's choice wins over the budget
    OrtRuntime(bundle, bundle.graph(), threads=1).close()
    assert seen == ["1", "0", "1"]


@pytest.mark.usefixtures("one_torch_thread")
def test_both_attention_kernels_compute_the_source_logits(fused):
    src, bundle = fused
    logits, tokens = {}, {}
    for flash in (False, True):
        with OrtRuntime(bundle, bundle.graph(), threads=2, prefill_chunk=16, gqa_flash=flash) as rt:
            steps = Steps(rt, PROMPTS, pad_id=0, room=STEPS)
            out = steps.prefill()
            got, ids = [out.logits], []
            for _ in range(STEPS):
                ids.append(out.logits.argmax(-1))
                out = steps.decode(ids[-1])
                got.append(out.logits)
        logits[flash], tokens[flash] = np.stack(got), np.stack(ids)  # (STEPS+1, B, V), (STEPS, B)

    ids, mask = left_pad(PROMPTS, 0)  # (B, L): the padding makes an attention bias in the graph
    ref = HFReference(src)(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(positions(mask)))
    tol = TOLERANCES["fp32"]["logits"][0]  # fp32 against transformers, as parity judges it
    for flash in (False, True):
        assert float(np.abs(logits[flash][0] - ref.logits[:, -1].numpy()).max()) <= tol
    np.testing.assert_allclose(logits[True], logits[False], atol=1e-5, rtol=0)  # fp32 sums in another order
    # ... but another order: onnxruntime did read the variable (it is not a documented session option)
    assert not np.array_equal(logits[True], logits[False])
    np.testing.assert_array_equal(tokens[True], tokens[False])
