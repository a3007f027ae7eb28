"""The `ort` runtime prefills long prompts in chunks (runtimes/ort.PREFILL_CHUNK), each chunk
attending to the cache the chunks before it wrote. It must compute what one call computes: the
source framework's logits and attention for a left-padded batch whose shortest row is all padding
in the first chunks, the same cache for the decode steps that follow, in both KV modes (a fused
graph writing one shared buffer, a portable graph copying past + new), and, when recording, the
(B, nh, T, T) attention one call returns."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gptdeploy.exporters.export import export_bundle
from gptdeploy.exporters.references import HFReference
from gptdeploy.parity import TOLERANCES
from gptdeploy.runtimes.ort import OrtRuntime
from gptdeploy.steps import Steps, left_pad, positions
from tests.factories import make_hf_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest
# 23, 2 and 11 tokens: with chunks of 4 the short rows are all padding for the first chunks
PROMPTS = [list(range(3, 26)), [42, 43], [7, 7, 3, 250, 9, 11, 13, 17, 19, 23, 29]]
CHUNK = 4
STEPS = 10
LOGITS_TOL = TOLERANCES["fp32"]["logits"][0]  # fp32 against transformers, as parity judges it
ATTN_TOL = TOLERANCES["fp32"]["attention"][0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A GQA 2:1 Llama: its default fp32 bundle (fused, shared buffer, attention outputs) and the
    portable one (standard ONNX, copying), with the source they came from."""
    root = tmp_path_factory.mktemp("prefill-chunks")
    src = make_hf_dir(root / "src", "llama", seed=3, hidden_size=64, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return src, {"fused": export_bundle(src, root / "fused").bundle,
                 "portable": export_bundle(src, root / "portable", portable=True).bundle}


def _chain(bundle, chunk: int | None, record: bool):
    """Prefill + STEPS greedy decodes: stacked logits, the prefill's attention, the final cache."""
    with OrtRuntime(bundle, bundle.graph(), threads=1, prefill_chunk=chunk) as rt:
        steps = Steps(rt, PROMPTS, pad_id=0, room=STEPS)
        out = steps.prefill(record)
        logits, prefill_attention = [out.logits], out.attentions
        for _ in range(STEPS):
            out = steps.decode(out.logits.argmax(-1))
            logits.append(out.logits)
        return np.stack(logits), prefill_attention, rt.take_cache()


@pytest.mark.parametrize("kind", ["fused", "portable"])
def test_chunked_prefill_matches_transformers_and_the_whole_prompt_call(llama, kind):
    src, bundles = llama
    bundle = bundles[kind]
    assert bundle.graph().kv_shared_buffer is (kind == "fused")
    whole, whole_att, whole_cache = _chain(bundle, None, record=True)
    got, att, cache = _chain(bundle, CHUNK, record=True)

    ids, mask = left_pad(PROMPTS, 0)  # (B, L)
    ref = HFReference(src)(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(positions(mask)))
    assert float(np.abs(got[0] - ref.logits[:, -1].numpy()).max()) <= LOGITS_TOL
    real = mask.astype(bool)  # (B, L): pad query rows are arbitrary on every side, never read
    for a, r in zip(att, ref.attentions):  # per layer (B, nh, L, L)
        assert a.shape == tuple(r.shape)
        diff = np.abs(a - r.numpy()).max(axis=(1, 3))  # (B, L) worst over heads and keys
        assert float(diff[real].max()) <= ATTN_TOL

    # the same computation as one call: logits of every step, the cache, the recorded rows
    np.testing.assert_allclose(got, whole, atol=1e-5, rtol=0)  # fp32 sums in another order at most
    held = np.concatenate([real, np.ones((len(PROMPTS), STEPS), bool)], axis=1)  # (B, L+STEPS)
    for c, w in zip(cache, whole_cache):  # (B, nkv, L+STEPS, hs); a pad slot's K/V is never read
        np.testing.assert_allclose(c.transpose(0, 2, 1, 3)[held], w.transpose(0, 2, 1, 3)[held], atol=1e-5, rtol=0)
    for a, w in zip(att, whole_att):
        a, w = a.transpose(0, 2, 1, 3)[real], w.transpose(0, 2, 1, 3)[real]  # real query rows (n, nh, L)
        np.testing.assert_allclose(a, w, atol=1e-6, rtol=0)


def test_chunks_without_recording_and_the_last_chunk_short(llama):
    """Not recording (the scratch-bound attention outputs), T = 23 in chunks of 5 (a short last one)
    and of T or more (one call): the logits of the chain agree."""
    _, bundles = llama
    bundle = bundles["fused"]
    want, _, _ = _chain(bundle, None, record=False)
    for chunk in (5, 23, 64):
        got, att, _ = _chain(bundle, chunk, record=False)
        assert att is None
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_chunk_size_is_checked(llama):
    _, bundles = llama
    bundle = bundles["fused"]
    with pytest.raises(ValueError, match="prefill_chunk must be a positive"):
        OrtRuntime(bundle, bundle.graph(), threads=1, prefill_chunk=0)
    entry = dataclasses.replace(bundle.graph(), kv_shared_buffer=False)  # the copying mode on the fused graph
    with OrtRuntime(bundle, entry, threads=1, prefill_chunk=CHUNK) as rt:
        out = Steps(rt, PROMPTS, pad_id=0).prefill()
    with OrtRuntime(bundle, bundle.graph(), threads=1, prefill_chunk=CHUNK) as rt:
        np.testing.assert_allclose(Steps(rt, PROMPTS, pad_id=0).prefill().logits, out.logits, atol=1e-5, rtol=0)
