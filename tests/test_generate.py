"""Generator: golden parity with transformers and the torch runtime, batching, sampling,
streaming, stop rules, attention recording, bad input, threads, the CLI, and a run path
that works with torch, transformers and onnx absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gptdeploy import Generator
from gptdeploy.bundle import Bundle
from gptdeploy.errors import (
    BackendUnavailable,
    BundleError,
    ContextOverflowError,
    GenerationError,
    RuntimeFailure,
)
from gptdeploy.runtimes.base import RuntimeBase, StepOutput
from gptdeploy.sampling import Sampler, SamplingParams, penalize
from gptdeploy.tokenizer import IncrementalDecoder, Tokenizer
from tests.runtime_bundles import SAMPLE_DIR, copy_bundle, made

GOLDEN_STEPS = 64
PROMPTS = ["The quick brown fox", "你好，世界。我们一起学习", "A", "Numbers 0123 and (brackets)"]
ZH = "你好，世界。注意力机制很有用。今天天气很好。"
EN = "The quick brown fox jumps over the lazy dog."


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


@pytest.fixture(scope="module")
def small() -> Generator:
    with Generator.load(made("small").bundle, threads=1) as gen:
        yield gen


@pytest.fixture(scope="module")
def padded() -> Generator:
    with Generator.load(made("padded").bundle, threads=1) as gen:
        yield gen


# ------------------------------------------------------------------------------ golden parity


def _hf_greedy(hf_dir: Path, prompt_ids: list[int], steps: int, eos: int) -> list[int]:
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=steps,
            pad_token_id=eos,
            eos_token_id=eos,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("name", ["small", "padded"])
def test_greedy_tokens_equal_torch_runtime_and_transformers(name):
    m = made(name)
    with (
        Generator.load(m.bundle, threads=1) as gen_ort,
        Generator.load(m.bundle, backend="torch", threads=1) as gen_torch,
    ):
        assert gen_ort.runtime.name == "ort" and gen_torch.runtime.name == "torch"
        for prompt in PROMPTS:
            got = gen_ort.generate(prompt, max_new_tokens=GOLDEN_STEPS)
            ref = gen_torch.generate(prompt, max_new_tokens=GOLDEN_STEPS)
            hf = _hf_greedy(m.hf_dir, got.prompt_token_ids, GOLDEN_STEPS, gen_ort.tokenizer.eos_token_id)
            assert got.token_ids == ref.token_ids == hf, prompt
            assert got.finish_reason in ("length", "eos")


@pytest.mark.slow
def test_greedy_parity_on_the_sample(tmp_path):
    from gptdeploy.exporters import export_bundle

    bundle = export_bundle(SAMPLE_DIR, tmp_path / "sample").bundle.path
    with (
        Generator.load(bundle, threads=1) as gen_ort,
        Generator.load(bundle, backend="torch", threads=1) as gen_torch,
    ):
        for prompt in ["他喜欢吃", "Once upon a time", "高军说："]:
            got = gen_ort.generate(prompt, max_new_tokens=GOLDEN_STEPS)
            assert got.token_ids == gen_torch.generate(prompt, max_new_tokens=GOLDEN_STEPS).token_ids
            hf = _hf_greedy(SAMPLE_DIR, got.prompt_token_ids, GOLDEN_STEPS, gen_ort.tokenizer.eos_token_id)
            assert got.token_ids == hf, prompt


def test_repetition_penalty_matches_transformers(small):
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(made("small").hf_dir, attn_implementation="eager").eval()
    eos = small.tokenizer.eos_token_id
    for prompt in PROMPTS[:2]:
        got = small.generate(prompt, max_new_tokens=24, repetition_penalty=1.7)
        ids = torch.tensor([got.prompt_token_ids])
        with torch.no_grad():
            hf = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=24,
                repetition_penalty=1.7,
                pad_token_id=eos,
                eos_token_id=eos,
            )
        assert got.token_ids == hf[0, ids.shape[1] :].tolist()
        assert (
            got.token_ids != small.generate(prompt, max_new_tokens=24).token_ids
        )  # the penalty did something


# ------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("name", ["small", "padded"])
def test_batched_greedy_equals_each_prompt_alone(name):
    with Generator.load(made(name).bundle, threads=1) as gen:
        batch = gen.generate(PROMPTS, max_new_tokens=40)
        assert isinstance(batch, list) and len(batch) == len(PROMPTS)
        for prompt, row in zip(PROMPTS, batch):
            alone = gen.generate(prompt, max_new_tokens=40)
            assert row.token_ids == alone.token_ids, prompt
            assert row.text == alone.text and row.prompt_token_ids == alone.prompt_token_ids
            assert row.finish_reason == alone.finish_reason


# ------------------------------------------------------------------------------- sampling


def test_same_seed_same_text_and_different_seeds_differ(padded):
    kw = {"max_new_tokens": 32, "temperature": 1.0}
    a = padded.generate("The quick brown fox", seed=7, **kw)
    b = padded.generate("The quick brown fox", seed=7, **kw)
    c = padded.generate("The quick brown fox", seed=8, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids
    batch = padded.generate(["The quick brown fox", "你好"], seed=7, **kw)
    assert batch[0].token_ids == padded.generate(["The quick brown fox", "你好"], seed=7, **kw)[0].token_ids


def test_an_unseeded_sample_reports_the_seed_that_reproduces_it(padded):
    first = padded.generate(EN, max_new_tokens=16, temperature=1.0)
    assert isinstance(first.sampling.seed, int)
    again = padded.generate(EN, max_new_tokens=16, temperature=1.0, seed=first.sampling.seed)
    assert again.token_ids == first.token_ids
    assert padded.generate(EN, max_new_tokens=2).sampling.seed is None  # greedy needs none


def test_top_k_1_and_tiny_top_p_are_greedy(padded):
    greedy = padded.generate(EN, max_new_tokens=20).token_ids
    assert padded.generate(EN, max_new_tokens=20, temperature=0.9, top_k=1, seed=1).token_ids == greedy
    assert padded.generate(EN, max_new_tokens=20, temperature=0.9, top_p=1e-9, seed=2).token_ids == greedy


def test_top_k_and_top_p_keep_only_their_candidates():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 50257)).astype(np.float32) * 3  # a GPT-2-sized vocabulary
    order = np.argsort(-logits[0])
    s = Sampler(SamplingParams(temperature=1.0, top_k=5, seed=0))
    assert {int(s(logits, None)[0]) for _ in range(200)} <= set(order[:5].tolist())
    # The nucleus by brute force: sort everything, keep tokens until the mass reaches top_p.
    for top_p in (0.05, 0.5, 0.97):
        probs = np.exp(logits[0].astype(np.float64) - logits.max())
        probs /= probs.sum()
        n = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
        nucleus = set(order[:n].tolist())
        s = Sampler(SamplingParams(temperature=1.0, top_p=top_p, seed=1))
        drawn = {int(s(logits, None)[0]) for _ in range(300)}
        assert drawn <= nucleus, top_p
        assert len(drawn) > min(n, 300) // 4  # it samples, not argmax


def test_nan_logits_are_a_clear_error_not_a_token():
    logits = np.zeros((2, 10), dtype=np.float32)
    logits[1, 3] = np.nan
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=0)):
        with pytest.raises(RuntimeFailure, match="NaN logits"):
            Sampler(params)(logits, None)


def test_repetition_penalty_equals_transformers_processor():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 40)).astype(np.float32)
    ids = np.array([[1, 5, 5, 7], [0, 39, 2, 3]])
    seen = np.zeros((2, 40), dtype=bool)
    seen[np.arange(2)[:, None], ids] = True
    want = RepetitionPenaltyLogitsProcessor(1.3)(
        torch.from_numpy(ids), torch.from_numpy(logits.copy())
    ).numpy()
    np.testing.assert_allclose(penalize(logits, seen, 1.3), want, rtol=1e-6)


# ------------------------------------------------------------------ streaming and text pieces


@pytest.mark.parametrize("prompt", [ZH, EN, "他喜欢", "Once upon a time"])
@pytest.mark.parametrize(
    "sampling", [{}, {"temperature": 1.0, "seed": 3}, {"temperature": 0.8, "top_k": 40, "seed": 5}]
)
def test_stream_pieces_concatenate_to_the_generated_text(small, prompt, sampling):
    whole = small.generate(prompt, max_new_tokens=40, **sampling)
    stream = small.stream(prompt, max_new_tokens=40, **sampling)
    pieces = list(stream)
    assert "".join(pieces) == whole.text
    assert all(p and p.encode("utf-8").decode("utf-8") == p for p in pieces)
    assert stream.result.token_ids == whole.token_ids and stream.result.text == whole.text


def test_incremental_decoder_never_splits_a_character(small):
    tok = small.tokenizer
    for text in (ZH, "饕餮 🙂 café", EN):
        ids = tok.encode(text)
        if text != EN:
            assert any("\ufffd" in tok.decode([i]) for i in ids)  # characters really are split across tokens
        dec = IncrementalDecoder(tok, context=tok.encode("前文 "))
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


# -------------------------------------------------- scripted runtime: stop rules, rows, padding


class ScriptedRuntime(RuntimeBase):
    """Emits a fixed token per row and step; padding columns (past the tokenizer) always score
    highest, so sampling them would show. Records what the Generator feeds it."""

    name = "scripted"

    def __init__(self, bundle: Bundle, scripts: list[list[int]]):
        super().__init__(bundle, bundle.graph())
        self.scripts = scripts
        self.calls: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []

    def _logits(self, step: int) -> StepOutput:
        V, n_tok = self.bundle.config.vocab_size, self.bundle.manifest.tokenizer.vocab_size
        logits = np.zeros((len(self.scripts), V), dtype=np.float32)
        logits[:, n_tok:] = 50.0
        for b, script in enumerate(self.scripts):
            logits[b, script[min(step, len(script) - 1)]] = 30.0
        return StepOutput(logits)

    def _prefill(self, ids, mask, pos, record):
        self.calls.append(("prefill", ids.copy(), mask.copy(), pos.copy()))
        self.step = 0
        return self._logits(0)

    def _decode(self, ids, mask, pos, record):
        self.calls.append(("decode", ids.copy(), mask.copy(), pos.copy()))
        self.step += 1
        return self._logits(self.step)

    def _drop_cache(self):
        pass

    def _release(self):
        pass


def _scripted(scripts: list[list[int]]) -> Generator:
    bundle = Bundle.load(made("padded").bundle)
    assert bundle.config.vocab_size > bundle.manifest.tokenizer.vocab_size  # padding columns exist
    return Generator(ScriptedRuntime(bundle, scripts), Tokenizer.from_bundle(bundle), bundle)


def test_scripted_chinese_streams_whole_characters_and_padding_is_never_sampled():
    gen = _scripted([])
    ids = gen.tokenizer.encode(ZH)
    gen.runtime.scripts = [ids]
    for kw in ({}, {"temperature": 1.5, "seed": 0}):
        pieces = list(gen.stream("前文", max_new_tokens=len(ids), **kw))
        assert "".join(pieces) == ZH
        assert not any("\ufffd" in p for p in pieces)
        assert len(pieces) < len(ids)  # split characters were held back and joined


@pytest.mark.parametrize("stop", [["world"], ["orl", "xyz"], ["d. B"], ["Bye"]])
def test_stop_strings_cut_the_text_also_when_streaming(stop):
    gen = _scripted([])
    gen.runtime.scripts = [gen.tokenizer.encode("Hello world. Bye now")]
    result = gen.generate("x", max_new_tokens=30, stop=stop)
    cut = min(i for s in stop if (i := "Hello world. Bye now".find(s)) >= 0)
    assert result.text == "Hello world. Bye now"[:cut]
    assert result.finish_reason == "stop_string"
    stream = gen.stream("x", max_new_tokens=30, stop=stop)
    pieces = list(stream)
    assert "".join(pieces) == result.text
    assert stream.result.finish_reason == "stop_string"


def test_eos_and_stop_ids_end_rows_separately_and_finished_rows_are_frozen():
    gen = _scripted([])
    tok = gen.tokenizer
    eos = tok.eos_token_id
    a, b, c = tok.encode("ab"), tok.encode("cdef"), tok.encode("Hello")
    gen.runtime.scripts = [a + [eos, 5, 6], b + [7, 8, 9, 10], c + [11, 12, 13]]
    out = gen.generate(["x", "a much longer prompt", "yy"], max_new_tokens=9, stop_token_ids=[c[-1]])
    assert out[0].token_ids == a + [eos] and out[0].finish_reason == "eos" and out[0].text == "ab"
    assert out[1].token_ids == (b + [7, 8, 9] + [10] * 9)[:9] and out[1].finish_reason == "length"
    assert out[2].token_ids == c and out[2].finish_reason == "stop_token" and out[2].text == "Hell"
    # Finished rows are fed the pad token; left padding gets mask 0 and positions count real tokens.
    pad = tok.pad_token_id
    _, ids, mask, pos = gen.runtime.calls[0]
    lens = [len(tok.encode(p)) for p in ["x", "a much longer prompt", "yy"]]
    L = max(lens)
    for row, n in enumerate(lens):
        assert mask[row].tolist() == [0] * (L - n) + [1] * n
        assert pos[row, L - n :].tolist() == list(range(n))
        assert (ids[row, : L - n] == pad).all()
    decodes = [c for c in gen.runtime.calls if c[0] == "decode"]
    assert len(decodes) == 8
    last = decodes[-1]
    assert last[1][0, 0] == pad and last[1][2, 0] == pad  # rows 0 and 2 finished earlier
    assert last[2].shape == (3, L + 8) and (last[2][:, L:] == 1).all()
    assert last[3][:, 0].tolist() == [n + 7 for n in lens]


def test_generation_stops_when_every_row_is_done():
    gen = _scripted([])
    eos = gen.tokenizer.eos_token_id
    gen.runtime.scripts = [[1, eos], [2, 3, eos]]
    out = gen.generate(["x", "y"], max_new_tokens=50)
    assert [r.finish_reason for r in out] == ["eos", "eos"]
    assert sum(c[0] == "decode" for c in gen.runtime.calls) == 2


# ---------------------------------------------------------------------- attention recording


def test_recorded_attention_equals_the_module_on_the_final_sequence(padded):
    """Left-padded batch, assembled across decode steps, padding stripped, against the canonical
    module run once, uncached, on each row's own prompt + generated tokens."""
    import torch

    from gptdeploy.runtimes.torch import TorchRuntime

    prompts = ["你好，世界", "The quick brown fox jumps", "A"]
    out = padded.generate(prompts, max_new_tokens=6, record_attention=True)
    bundle = padded.bundle
    ref = TorchRuntime(bundle, bundle.graph(), None).model
    c = bundle.config
    for r in out:
        seq = r.attention_token_ids
        S = len(seq)
        assert S == len(r.prompt_token_ids) + len(r.token_ids) - 1
        ids = torch.tensor([seq])
        with torch.no_grad():
            _, _, atts = ref(ids, torch.ones_like(ids), torch.arange(S)[None], ref.empty_past(1))
        assert len(r.attention) == c.n_layer
        for layer, (got, want) in enumerate(zip(r.attention, atts)):
            assert got.shape == (1, c.n_head, S, S) and got.dtype == np.float32
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0, err_msg=f"layer {layer}")
            np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
            assert (np.triu(got[0], k=1) == 0).all()
    assert padded.generate("hi", max_new_tokens=3).attention is None


# ---------------------------------------------------------------------------------- timings


def test_timings_are_filled(small):
    r = small.generate(EN, max_new_tokens=12)
    t = r.timings
    assert t.tokens == len(r.token_ids) == 12
    assert 0 < t.time_to_first_token_s <= t.total_s
    assert t.decode_tokens_per_s > 0
    assert set(t.to_dict()) == {"tokens", "time_to_first_token_s", "decode_tokens_per_s", "total_s"}


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"prompt": ""}, GenerationError, "prompt is empty"),
        ({"prompt": ["ok", ""]}, GenerationError, "prompt is empty"),
        ({"prompt": []}, GenerationError, "no prompts"),
        ({"prompt": 42}, GenerationError, "must be a string"),
        ({"prompt": "word " * 200}, ContextOverflowError, "context is 128 positions; shorten the prompt"),
        ({"max_new_tokens": 0}, GenerationError, "max_new_tokens must be an integer >= 1"),
        ({"max_new_tokens": -3}, GenerationError, "max_new_tokens must be an integer >= 1"),
        ({"max_new_tokens": 2.5}, GenerationError, "max_new_tokens must be an integer >= 1"),
        (
            {"max_new_tokens": 500},
            ContextOverflowError,
            r"needs 50\d positions; the model has 128. Lower max_new_tokens to 12\d",
        ),
        ({"temperature": -0.1}, GenerationError, "temperature must be a number >= 0"),
        ({"temperature": float("nan")}, GenerationError, "temperature"),
        ({"top_p": 0.0}, GenerationError, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, GenerationError, r"top_p must be in \(0, 1\]"),
        ({"top_p": -1}, GenerationError, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, GenerationError, "top_k must be an integer >= 0"),
        ({"repetition_penalty": 0}, GenerationError, "repetition_penalty must be a number > 0"),
        ({"repetition_penalty": -1.0}, GenerationError, "repetition_penalty"),
        ({"seed": -1}, GenerationError, "seed must be a non-negative integer"),
        ({"stop": [""]}, GenerationError, "stop strings must be non-empty"),
        ({"stop_token_ids": [10_000]}, GenerationError, "stop token id 10000 is not in the vocabulary"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_work(small, monkeypatch, kwargs, error, match):
    calls = []
    monkeypatch.setattr(small.runtime, "prefill", lambda *a, **k: calls.append(a))
    kwargs = {"prompt": "hello", **kwargs}
    with pytest.raises(error, match=match):
        small.generate(kwargs.pop("prompt"), **kwargs)
    assert calls == []  # checked before the model ran


def test_bad_stream_and_id_input(small):
    with pytest.raises(GenerationError, match="stream takes one prompt"):
        small.stream(["a", "b"])
    with pytest.raises(GenerationError, match="prompt is empty"):
        small.stream("")  # raised at the call, not at the first iteration
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        small.generate_ids([[1, 2, 99999]])
    with pytest.raises(GenerationError, match="no token ids"):
        small.generate_ids([[]])
    with pytest.raises(GenerationError, match="lists of integer token ids"):
        small.generate_ids([[1, 2.5]])
    with pytest.raises(GenerationError, match="lists of integer token ids"):
        small.generate_ids(["abc"])
    assert small.generate_ids([np.array([1, 2, 3])], max_new_tokens=2)[0].prompt_token_ids == [1, 2, 3]
    with (
        Generator.load(made("small", attentions=False).bundle) as gen,
        pytest.raises(GenerationError, match="no attention outputs"),
    ):
        gen.generate("hi", record_attention=True)


def test_bundle_problems_are_bundle_errors(tmp_path):
    src = made("small").bundle
    missing = copy_bundle(src, tmp_path / "missing")
    (missing / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx is missing"):
        Generator.load(missing)
    altered = copy_bundle(src, tmp_path / "altered")
    raw = bytearray((altered / "tokenizer.json").read_bytes())
    raw[10] ^= 1
    (altered / "tokenizer.json").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="tokenizer.json does not match its SHA-256"):
        Generator.load(altered)
    broken = copy_bundle(src, tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match="cannot read tokenizer"):
        Generator.load(broken, verify_hashes=False)
    (broken / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    (broken / "model.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(BundleError, match="onnxruntime cannot load graph"):
        Generator.load(broken, verify_hashes=False)
    with pytest.raises(BundleError, match="does not exist"):
        Generator.load(tmp_path / "nowhere")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        Generator.load(src, backend="cuda")


# ---------------------------------------------------------------------------------- threads


def test_concurrent_calls_are_batched_and_each_gets_its_own_result(small):
    prompts = PROMPTS * 2
    alone = [small.generate(p, max_new_tokens=16).token_ids for p in prompts]
    got: dict[int, list[int]] = {}
    errors = []

    def work(i):
        try:
            got[i] = small.generate(prompts[i], max_new_tokens=16).token_ids
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [got[i] for i in range(len(prompts))] == alone


def test_a_call_while_a_stream_is_open_in_the_same_thread_shares_the_engine(small):
    """The engine runs every request on its own thread: an unfinished stream no longer blocks its
    thread's next call (it did under the old lock), and both get their results alone."""
    whole, hi = small.generate(EN, max_new_tokens=20).text, small.generate("hi", max_new_tokens=5).token_ids
    stream = small.stream(EN, max_new_tokens=20)
    first = next(stream)
    assert small.generate("hi", max_new_tokens=5).token_ids == hi  # while the stream is open, here
    assert first + "".join(stream) == whole
    with small.stream(EN, max_new_tokens=20) as s:  # leaving the with-block cancels the request
        next(s)
    assert small.generate("hi", max_new_tokens=2).timings.tokens == 2


def test_close_lets_requests_in_flight_finish_then_refuses_new_ones():
    gen = Generator.load(made("small").bundle, threads=1)
    whole = gen.generate(EN, max_new_tokens=30).text
    stream = gen.stream(EN, max_new_tokens=30)
    first = next(stream)
    gen.close()  # waits for the open stream's request, in this thread or any other
    assert first + "".join(stream) == whole and stream.result.text == whole
    with pytest.raises(GenerationError, match="closed"):
        gen.generate("hi", max_new_tokens=2)
    with pytest.raises(GenerationError, match="closed"):
        gen.stream("hi", max_new_tokens=2)
    gen.close()  # twice is fine


# -------------------------------------------------------------------------------------- CLI


def _invoke(args, input=None):
    from gptdeploy.cli import cli

    return CliRunner().invoke(cli, ["generate", *[str(a) for a in args]], input=input)


def test_cli_prints_text_json_and_streams_from_stdin(small):
    b = made("small").bundle
    want = small.generate("你好", max_new_tokens=8)
    r = _invoke([b, "你好", "--max-new-tokens", 8, "--threads", 1])
    assert r.exit_code == 0, r.output
    assert r.stdout == want.text + "\n"
    r = _invoke([b, "你好", "--max-new-tokens", 8, "--json"])
    data = json.loads(r.stdout)
    assert data["text"] == want.text and data["token_ids"] == want.token_ids
    assert data["prompt_token_ids"] == want.prompt_token_ids and data["backend"] == "ort"
    assert set(data["timings"]) >= {"time_to_first_token_s", "decode_tokens_per_s", "total_s", "tokens"}
    r = _invoke([b, "-", "--max-new-tokens", 8, "--stream"], input="你好\n".encode())
    assert r.exit_code == 0 and r.stdout == want.text + "\n"
    sampled = small.generate("hi", max_new_tokens=8, temperature=0.8, seed=7, stop=["zz"])
    r = _invoke([b, "hi", "--max-new-tokens", 8, "--temperature", 0.8, "--seed", 7, "--stop", "zz", "--json"])
    assert json.loads(r.stdout)["token_ids"] == sampled.token_ids


@pytest.mark.parametrize(
    "args, stdin, match",
    [
        (["-"], b"\xff\xfeabc", "stdin is not UTF-8"),
        ([""], None, "prompt is empty"),
        (["hi", "--max-new-tokens", "0"], None, "max_new_tokens must be"),
        (["hi", "--max-new-tokens", "1000"], None, "Lower max_new_tokens"),
        (["hi", "--temperature", "-1"], None, "temperature must be"),
        (["hi", "--top-p", "2"], None, "top_p must be"),
        (["hi", "--backend", "nope"], None, "unknown backend"),
        (["hi", "--backend", "tensorrt"], None, "tensorrt is not installed"),
        (["hi", "--threads", "0"], None, "threads must be"),
        (["hi", "--graph", "int4"], None, "no graph 'int4'"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(args, stdin, match):
    r = _invoke([made("small").bundle, *args], input=stdin)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr
    assert "Traceback" not in r.output


def test_cli_bundle_errors_exit_2(tmp_path):
    altered = copy_bundle(made("small").bundle, tmp_path / "b")
    (altered / "model.onnx").write_bytes(b"x")
    r = _invoke([altered, "hi"])
    assert r.exit_code == 2 and "does not match its SHA-256" in r.stderr
    r = _invoke([tmp_path / "none", "hi"])
    assert r.exit_code == 2 and "does not exist" in r.stderr


# ----------------------------------------------------------------------- torch-free run path

TORCH_FREE = """
import json, sys
for name in ("torch", "transformers", "onnx", "onnxscript", "safetensors"):
    sys.modules[name] = None  # any import of them raises ImportError
from click.testing import CliRunner
from gptdeploy import Generator
from gptdeploy.errors import BackendUnavailable
bundle = sys.argv[1]
gen = Generator.load(bundle)
out = gen.generate("你好", max_new_tokens=8)
pieces = list(gen.stream("Hello", max_new_tokens=8))
batch = gen.generate(["a", "bcd"], max_new_tokens=4, temperature=0.7, seed=1, record_attention=True)
try:
    Generator.load(bundle, backend="torch")
    torch_backend = "loaded"
except BackendUnavailable as exc:
    torch_backend = str(exc)
from gptdeploy.cli import cli
res = CliRunner().invoke(cli, ["generate", bundle, "hi", "--max-new-tokens", "4", "--json"])
leaked = sorted(m for m in ("torch", "transformers", "onnx") if sys.modules.get(m) is not None)
print(json.dumps({"ids": out.token_ids, "pieces": pieces, "cli": res.exit_code, "cli_out": res.output,
                  "torch_backend": torch_backend, "leaked": leaked, "batch": [r.token_ids for r in batch]}))
"""


def test_run_path_works_without_torch_transformers_and_onnx(small):
    b = str(made("small").bundle)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, b],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["leaked"] == []
    assert data["ids"] == small.generate("你好", max_new_tokens=8).token_ids
    assert "".join(data["pieces"]) == small.generate("Hello", max_new_tokens=8).text
    assert data["cli"] == 0, data["cli_out"]
    assert "torch is not installed" in data["torch_backend"] and "gptdeploy[export]" in data["torch_backend"]
