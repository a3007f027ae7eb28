"""The batching engine: a request's tokens are the same alone or among others (greedy and seeded
sampling, joining mid-batch), rows are freed and reused, the KV cache grows and shrinks with the
batch, cancellation, timeouts, the bounded queue, shutdown, the async API, and the host-side
cache API of each runtime."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time

import numpy as np
import pytest

from gptdeploy import Generator
from gptdeploy.bundle import Bundle
from gptdeploy.engine import Engine, EngineLimits
from gptdeploy.engine.layout import gather, step_inputs
from gptdeploy.errors import BackendUnavailable, GenerationError, QueueFullError, RequestAborted
from gptdeploy.runtimes.backends import open_runtime
from gptdeploy.runtimes.ort import OrtRuntime
from gptdeploy.sampling import Sampler
from gptdeploy.steps import Steps
from gptdeploy.tokenizer import Tokenizer
from tests.engine_waits import slow_step, until
from tests.runtime_bundles import left_padded, made

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

PROMPTS = [
    "The quick brown fox",
    "你好，世界。我们一起学习",
    "A",
    "Numbers 0123 and (brackets)",
    "注意力机制很有用。",
    "Attention is all you need!",
    "今天",
    'quotes "like this"',
]
# Each request keeps its own options: greedy, seeded samples, top-k/top-p, a penalty, stops, lengths.
OPTIONS = [
    {"max_new_tokens": 40},
    {"max_new_tokens": 25, "temperature": 1.0, "seed": 11},
    {"max_new_tokens": 7},
    {"max_new_tokens": 33, "temperature": 0.8, "top_k": 20, "seed": 5},
    {"max_new_tokens": 18, "repetition_penalty": 1.5},
    {"max_new_tokens": 30, "temperature": 1.2, "top_p": 0.9, "seed": 3, "stop": ["e"]},
    {"max_new_tokens": 1},
    {"max_new_tokens": 21, "temperature": 0.7, "seed": 9, "repetition_penalty": 1.3},
]


def _engine(name="padded", backend="ort", max_batch=8, max_queue=None, on_step=None) -> Engine:
    return Engine.load(
        made(name).bundle,
        backend=backend,
        threads=1,
        limits=EngineLimits(max_batch=max_batch, max_queue=max_queue),
        on_step=on_step,
    )


def _alone(engine: Engine) -> list:
    return [engine.submit(p, **o).wait() for p, o in zip(PROMPTS, OPTIONS)]


def _same(got, want) -> None:
    assert got.token_ids == want.token_ids and got.text == want.text
    assert got.finish_reason == want.finish_reason and got.sampling == want.sampling


# ------------------------------------------------------------------- the correctness test


@pytest.mark.parametrize("name, backend", [("padded", "ort"), ("small", "ort"), ("small", "torch")])
def test_requests_joining_mid_batch_get_the_tokens_they_get_alone(name, backend):
    sizes = []
    with _engine(name, backend, max_batch=5, on_step=lambda b, s: sizes.append(b)) as engine:
        alone = _alone(engine)
        sizes.clear()
        rng = random.Random(0)
        tickets = [None] * len(PROMPTS)

        def client(i):
            time.sleep(rng.random() * 0.05)  # arrivals spread over the first steps
            tickets[i] = engine.submit(PROMPTS[i], **OPTIONS[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for ticket, want in zip(tickets, alone):
            _same(ticket.wait(), want)
    assert max(sizes) > 1  # they really were batched


def test_late_joiners_and_reused_rows_in_a_running_batch():
    """A long request runs; others join it step by step, leave, and their rows are reused."""
    puts = []
    with _engine(max_batch=3) as engine:
        alone = _alone(engine)
        put = engine.runtime.put_cache
        engine.runtime.put_cache = lambda arrays: (puts.append(arrays[0].shape), put(arrays))[1]
        first = engine.submit(PROMPTS[0], **OPTIONS[0])
        assert _busy_until(engine, (0, 1))
        tickets = [first]
        for i in range(1, len(PROMPTS)):
            tickets.append(engine.submit(PROMPTS[i], **OPTIONS[i]))
            time.sleep(0.01)
        for ticket, want in zip(tickets, alone):
            _same(ticket.wait(), want)
    assert puts, "no request joined a running batch"
    assert max(b for b, *_ in puts) <= 3
    assert any(b == 1 for b, *_ in puts)  # the cache shrank with the batch


def test_a_batch_of_prompts_samples_each_row_with_its_own_seed():
    with _engine() as engine:
        gen = Generator(engine.runtime, engine.tokenizer, engine.bundle)
        kw = {"max_new_tokens": 20, "temperature": 1.0}
        batch = gen.generate(PROMPTS[:3], seed=100, **kw)
        for b, (prompt, row) in enumerate(zip(PROMPTS, batch)):
            assert row.sampling.seed == 100 + b  # the seed that reproduces the row alone
            _same(row, gen.generate(prompt, seed=100 + b, **kw))
        gen.close()


def test_a_single_prompt_samples_exactly_as_the_one_stream_loop_did():
    """The pre-engine loop: Steps + one Sampler (PCG64(seed), one draw per row per step)."""
    bundle = Bundle.load(made("padded").bundle)
    tok = Tokenizer.from_bundle(bundle)
    with Generator.load(made("padded").bundle, threads=1) as gen, open_runtime(bundle, "ort", None, 1) as rt:
        for prompt, seed in [(PROMPTS[0], 7), (PROMPTS[1], 123456789)]:
            params = gen.generate(prompt, max_new_tokens=1, temperature=0.9, top_k=30, seed=seed).sampling
            ids = tok.encode(prompt)
            steps, sampler, want = Steps(rt, [ids], tok.pad_token_id, room=24), Sampler(params), []
            out = steps.prefill()
            for _ in range(24):
                want.append(int(sampler(out.logits[:, : tok.vocab_size], None)[0]))
                out = steps.decode(np.array(want[-1:]))
            eos = tok.eos_token_id
            want = want[: want.index(eos) + 1] if eos in want else want
            assert (
                gen.generate(prompt, max_new_tokens=24, temperature=0.9, top_k=30, seed=seed).token_ids
                == want
            )


def test_attention_recorded_among_others_matches_alone_to_float_rounding():
    """Not bit for bit: the batch's padded cache width changes the order of float32 sums
    (measured max |diff| 1.3e-7; README)."""
    with _engine() as engine:
        alone = engine.submit(PROMPTS[1], max_new_tokens=9, record_attention=True).wait()
        other = engine.submit(PROMPTS[0], max_new_tokens=40)
        assert _busy_until(engine, (0, 1))
        joined = engine.submit(PROMPTS[1], max_new_tokens=9, record_attention=True).wait()
        other.wait()
    assert joined.token_ids == alone.token_ids
    for a, b in zip(joined.attention, alone.attention):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert other.result.attention is None


# ----------------------------------------------------------------- rows, limits and faults


def _busy_until(engine: Engine, want: tuple[int, int], seconds: float = 10.0) -> bool:
    """Wait until the engine has `want` = (requests waiting, requests in the batch)."""
    return until(lambda: engine.occupancy() == want, seconds)


def test_cancelling_frees_the_row_at_once():
    with _engine(on_step=slow_step) as engine:
        long = engine.submit(PROMPTS[0], max_new_tokens=70)
        other = engine.submit(PROMPTS[2], max_new_tokens=70)
        assert _busy_until(engine, (0, 2))
        long.cancel()
        assert _busy_until(engine, (0, 1), 2.0)  # the next round ends it
        assert until(lambda: engine.runtime._batch == 1, 2.0)  # and drops its cache row
        with pytest.raises(RequestAborted, match="cancelled") as caught:
            long.wait()
        assert caught.value.reason == "cancelled" and long.result is None
        assert len(other.wait().token_ids) == 70
        assert until(lambda: engine.runtime.past_length == 0, 2.0)  # an idle engine holds no cache


def test_queue_bound_timeout_and_bad_limits():
    with _engine(max_batch=1, max_queue=1, on_step=slow_step) as engine:
        running = engine.submit(PROMPTS[0], max_new_tokens=70)
        assert _busy_until(engine, (0, 1))
        waiting = engine.submit(PROMPTS[1], max_new_tokens=5)
        with pytest.raises(QueueFullError, match="queue holds 1"):
            engine.submit(PROMPTS[2], max_new_tokens=5)
        waiting.cancel()  # a waiting request can be cancelled too
        with pytest.raises(RequestAborted, match="cancelled"):
            waiting.wait(5)
        late = engine.submit(PROMPTS[2], max_new_tokens=5, timeout=0.001)
        with pytest.raises(RequestAborted, match="timed out"):
            late.wait(5)
        running.cancel()
    with pytest.raises(GenerationError, match="max_batch"):
        EngineLimits(max_batch=0)
    with pytest.raises(GenerationError, match="timeout"):
        _engine().submit("x", timeout=-1)


def test_close_with_a_grace_period_ends_what_is_still_running():
    engine = _engine(on_step=slow_step)
    quick = engine.submit(PROMPTS[2], max_new_tokens=2)
    slow = engine.submit(PROMPTS[0], max_new_tokens=70)
    assert _busy_until(engine, (0, 1))
    engine.close(grace=0.05)
    assert quick.wait().timings.tokens == 2
    with pytest.raises(RequestAborted, match="shutting down"):
        slow.wait(5)
    with pytest.raises(RequestAborted, match="closed"):
        engine.submit("x")


def test_the_async_api_streams_and_cancels_when_the_consumer_stops():
    with _engine(on_step=slow_step) as engine:
        want = engine.submit(PROMPTS[1], max_new_tokens=20).wait().text

        async def consume(pieces):
            async for _ in pieces:
                pass

        async def main():
            pieces = [p async for p in engine.stream(PROMPTS[1], max_new_tokens=20)]
            task = asyncio.create_task(consume(engine.stream(PROMPTS[0], max_new_tokens=70)))
            while engine.occupancy() != (0, 1):
                await asyncio.sleep(0.002)
            task.cancel()  # the consumer goes away (a client disconnects): the request is cancelled
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return pieces

        assert "".join(asyncio.run(main())) == want
        assert _busy_until(engine, (0, 0), 2.0)


def test_a_runtime_that_cannot_move_its_cache_batches_statically():
    class Fixed(OrtRuntime):  # as ort-cuda and tensorrt: no take_cache / put_cache
        _take_cache = OrtRuntime.__mro__[1]._take_cache
        _put_cache = OrtRuntime.__mro__[1]._put_cache

    bundle = Bundle.load(made("padded").bundle)
    rt = Fixed(bundle, bundle.graph(), 1)
    assert not rt.can_move_cache
    with Engine(rt, Tokenizer.from_bundle(bundle), bundle, EngineLimits(max_batch=3)) as engine:
        alone = _alone(engine)
        tickets = [engine.submit(p, **o) for p, o in zip(PROMPTS, OPTIONS)]
        for ticket, want in zip(tickets, alone):
            _same(ticket.wait(), want)
        rt.prefill(*left_padded([3], bundle.config.vocab_size))
        with pytest.raises(BackendUnavailable, match="continuous batching"):
            rt.take_cache()


# ------------------------------------------------------------------- layout and runtimes


def test_layout_right_aligns_rows_and_drops_columns_masked_everywhere():
    a = np.arange(2 * 1 * 4 * 2, dtype=np.float32).reshape(2, 1, 4, 2)  # (B=2, nkv=1, P=4, hs=2)
    b = 100 + np.arange(1 * 1 * 2 * 2, dtype=np.float32).reshape(1, 1, 2, 2)
    out = gather([[a], [b]], [(0, 1, 3), (1, 0, 2)])[0]  # row 1 of a (3 positions), row 0 of b (2)
    assert out.shape == (2, 1, 3, 2)
    np.testing.assert_array_equal(out[0, 0], a[1, 0, 1:])
    np.testing.assert_array_equal(out[1, 0], np.concatenate([np.zeros((1, 2)), b[0, 0]]))
    mask, pos = step_inputs(np.array([3, 2]), 3)
    assert mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]] and pos.tolist() == [[3], [2]]


def _runtime(bundle: Bundle, backend: str):
    if backend != "session":
        return open_runtime(bundle, backend, None, 1)
    import onnxruntime as ort

    from gptdeploy.runtimes.session import SessionRuntime

    graph = bundle.graph()
    session = ort.InferenceSession(str(bundle.file(graph.file)), providers=["CPUExecutionProvider"])
    return SessionRuntime(session, graph.signature)


@pytest.mark.parametrize("backend", ["ort", "torch", "session"])
def test_take_and_put_cache_round_trip_exactly(backend):
    bundle = Bundle.load(made("padded").bundle)
    ids, mask, pos = left_padded([5, 3], bundle.config.vocab_size)
    with _runtime(bundle, backend) as rt:
        rt.prefill(ids, mask, pos)
        cache = rt.take_cache()
        assert len(cache) == 2 * bundle.config.n_layer and cache[0].shape[:3] == (2, 4, 5)
        nxt = np.array([[1], [2]])
        mask1 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        want = rt.decode(nxt, mask1, pos[:, -1:] + 1).logits
        rt.put_cache(cache)
        assert (rt._batch, rt.past_length) == (2, 5)
        np.testing.assert_array_equal(rt.decode(nxt, mask1, pos[:, -1:] + 1).logits, want)
        with pytest.raises(GenerationError, match="put_cache needs"):
            rt.put_cache(cache[:-1])
        with pytest.raises(GenerationError, match="put_cache needs"):
            rt.put_cache([c.astype(np.float16) for c in cache])
