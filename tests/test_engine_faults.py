"""The batching engine under faults and limits: a failing step is the machine's fault
(RuntimeFailure), never the caller's; a runtime that cannot even reset stops the engine cleanly
instead of leaving callers hanging; the queue bound counts only what waits beyond the free rows;
a runtime's own limits (a TensorRT engine's context and batch) are checked before queueing and
never fail a batch mid-step; the decode-step hook counts the rows a step advanced; a ticket tells
observers when it ends."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gptdeploy.bundle import Bundle
from gptdeploy.engine import Engine, EngineLimits
from gptdeploy.errors import (
    ContextOverflowError,
    GenerationError,
    QueueFullError,
    RequestAborted,
    RuntimeFailure,
)
from gptdeploy.options import GenerationOptions
from gptdeploy.runtimes.base import RuntimeBase, StepOutput
from gptdeploy.runtimes.ort import OrtRuntime
from gptdeploy.tokenizer import Tokenizer
from tests.engine_waits import slow_step, until
from tests.runtime_bundles import made

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def _engine(max_batch=4, max_queue=None, on_step=None, runtime_class=OrtRuntime) -> Engine:
    bundle = Bundle.load(made("small").bundle)
    runtime = runtime_class(bundle, bundle.graph(), 1)
    limits = EngineLimits(max_batch=max_batch, max_queue=max_queue)
    return Engine(runtime, Tokenizer.from_bundle(bundle), bundle, limits, on_step)


# ---------------------------------------------------------------------- faults are RuntimeFailure


def test_a_step_that_raises_fails_its_batch_as_a_runtime_failure_and_the_engine_goes_on():
    with _engine(on_step=slow_step) as engine:
        decode, calls = engine.runtime._decode, []

        def failing(*args):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("boom at 0x7f00")
            return decode(*args)

        engine.runtime._decode = failing
        with engine._cond:  # the three join together
            tickets = [engine.submit(p, max_new_tokens=10) for p in ("The quick", "Hello", "A")]
        for t in tickets:
            with pytest.raises(RuntimeFailure, match=r"failed running a step on the ort runtime \(RuntimeError"):
                t.wait(10)
        assert not isinstance(tickets[0].error, GenerationError)  # not the caller's fault
        assert engine.failure is None
        assert len(engine.submit("The quick", max_new_tokens=3).wait(10).token_ids) == 3


def test_nan_logits_fail_only_that_request_as_a_runtime_failure():
    with _engine() as engine:
        decode = engine.runtime._decode

        def nan_in_row_0(*args):
            out = decode(*args)
            logits = out.logits.copy()
            logits[0] = np.nan
            return StepOutput(logits, out.attentions)

        engine.runtime._decode = nan_in_row_0
        with engine._cond:
            first, second = engine.submit("The quick", max_new_tokens=5), engine.submit("Hello", max_new_tokens=5)
        with pytest.raises(RuntimeFailure, match="NaN logits"):
            first.wait(10)
        with pytest.raises(RuntimeFailure, match="NaN logits"):  # row 0 again, once the first left
            second.wait(10)
        assert engine.failure is None


def test_onnxruntime_failing_a_run_is_a_runtime_failure():
    bundle = Bundle.load(made("small").bundle)
    with OrtRuntime(bundle, bundle.graph(), 1) as rt:
        ids = np.array([[10**6]])  # outside the embedding table: onnxruntime's Gather fails
        with pytest.raises(RuntimeFailure, match="onnxruntime failed running"):
            rt.prefill(ids, np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64))


def test_a_runtime_that_cannot_reset_stops_the_engine_and_no_caller_hangs():
    with _engine(on_step=slow_step) as engine:
        running = engine.submit("The quick", max_new_tokens=60)
        assert until(lambda: engine.occupancy() == (0, 1))
        waiting = [engine.submit("Hello", max_new_tokens=5) for _ in range(6)]  # 3 join, 3 wait
        reset = engine.runtime.reset

        def broken(*args):
            raise RuntimeError("the device is gone")

        def broken_reset():
            raise RuntimeError("reset failed too")

        engine.runtime._decode, engine.runtime.reset = broken, broken_reset
        for t in [running, *waiting]:
            with pytest.raises(RuntimeFailure):
                t.wait(10)  # every one ends: none is left to wait forever
        assert until(lambda: not engine._thread.is_alive(), 5.0)
        assert isinstance(engine.failure, RuntimeFailure) and "could not recover" in str(engine.failure)
        with pytest.raises(RuntimeFailure, match="No new requests"):
            engine.submit("x", max_new_tokens=2)
        assert engine.occupancy() == (0, 0)
        # A Generator's waits have no timeout: with the engine stopped, one ends at once.
        done = threading.Event()
        threading.Thread(target=lambda: (pytest.raises(RuntimeFailure, running.wait), done.set())).start()
        assert done.wait(5)
        engine.runtime.reset = reset


# ---------------------------------------------------------------------------- the queue bound


def test_the_queue_bound_counts_only_requests_beyond_the_free_rows():
    with _engine(max_batch=4, max_queue=0) as engine:
        assert len(engine.submit("The quick", max_new_tokens=3).wait(10).token_ids) == 3  # idle: taken
    with _engine(max_batch=4, max_queue=1, on_step=slow_step) as engine:
        with engine._cond:  # a burst within one step: 4 free rows and 1 place in the queue
            burst = [engine.submit("The quick", max_new_tokens=2) for _ in range(5)]
            with pytest.raises(QueueFullError, match="queue holds 1"):
                engine.submit("The quick", max_new_tokens=2)
        for t in burst:
            assert len(t.wait(10).token_ids) == 2
        req = engine.check([[5, 6]] * 5, GenerationOptions(max_new_tokens=2))
        assert len(engine.enqueue(req)) == 5  # an idle engine: 4 rows + 1 waiting
        with pytest.raises(GenerationError, match="at most 5 prompts") as refused:
            engine.enqueue(engine.check([[5, 6]] * 6, GenerationOptions(max_new_tokens=2)))
        assert not isinstance(refused.value, QueueFullError)  # it could never start: not a retry


# --------------------------------------------------------------- the runtime's own limits


class _Limited(OrtRuntime):
    """As a TensorRT engine built with a smaller --max-context and --max-batch: the runtime's own
    limits, which it enforces at every step."""

    def __init__(self, *args):
        super().__init__(*args)
        self.max_context, self.max_batch = 40, 3

    def _prefill(self, ids, mask, pos, record) -> StepOutput:
        self._fits(mask)
        return super()._prefill(ids, mask, pos, record)

    def _decode(self, ids, mask, pos, record) -> StepOutput:
        self._fits(mask)
        return super()._decode(ids, mask, pos, record)

    def _fits(self, mask) -> None:
        if mask.shape[1] > self.max_context or mask.shape[0] > self.max_batch:
            raise ContextOverflowError(f"{mask.shape} exceeds the engine's limits")


class _LimitedFixed(_Limited):  # and, as TensorRT, without take_cache / put_cache
    _take_cache = RuntimeBase._take_cache
    _put_cache = RuntimeBase._put_cache


def test_requests_are_checked_against_the_runtimes_limits_before_queueing():
    with _engine(max_batch=8, runtime_class=_Limited) as engine:
        assert (engine.max_context, engine.max_batch) == (40, 3)  # not the model's 128, the asked 8
        with pytest.raises(ContextOverflowError, match="has 40") as caught:
            engine.submit("Hello there", max_new_tokens=100)  # fits the model's 128, not the engine
        assert caught.value.param == "max_new_tokens"
        with pytest.raises(ContextOverflowError) as caught:
            engine.submit(list(range(5, 45)), max_new_tokens=1)
        assert caught.value.param == "prompt"
        tickets = [engine.submit("Hi", max_new_tokens=20) for _ in range(5)]
        assert all(len(t.wait(10).token_ids) == 20 for t in tickets)


def test_a_static_batch_takes_together_only_requests_whose_widths_fit():
    """Without cache moves every row is fed until the batch ends: a long prompt and a long
    generation may each fit alone and not together. They run one after the other, as alone."""
    long_prompt, long_run = (list(range(10, 35)), 10), ([5, 6], 30)  # 25 + 10 and 2 + 30 fit 40
    with _engine(runtime_class=_LimitedFixed) as engine:
        assert not engine.runtime.can_move_cache
        alone = [engine.submit(ids, max_new_tokens=n).wait(10).token_ids for ids, n in (long_prompt, long_run)]
        widths = []
        prefill = engine.runtime._prefill
        engine.runtime._prefill = lambda ids, *a: (widths.append(ids.shape), prefill(ids, *a))[1]
        with engine._cond:  # queued together: 25 + 30 would not fit
            tickets = [engine.submit(ids, max_new_tokens=n) for ids, n in (long_prompt, long_run)]
        assert [t.wait(10).token_ids for t in tickets] == alone
        assert widths == [(1, 25), (1, 2)]  # two batches, in order
        with engine._cond:  # two that fit together still share a batch
            pair = [engine.submit(ids, max_new_tokens=5) for ids in ([5, 6], [7, 8, 9])]
        assert all(len(t.wait(10).token_ids) == 5 for t in pair) and widths[-1] == (2, 3)


# ------------------------------------------------------------------------- observers


def test_the_step_hook_counts_the_rows_each_step_advanced_finishing_ones_included():
    sizes = []
    with _engine(on_step=lambda batch, seconds: sizes.append(batch)) as engine:
        engine.submit("The quick", max_new_tokens=2).wait(10)  # 1 from the prefill, 1 from one step
        assert sizes == [1]
        with engine._cond:
            a, b = engine.submit("The quick", max_new_tokens=3), engine.submit("Hello", max_new_tokens=3)
        a.wait(10), b.wait(10)
        assert sizes == [1, 2, 2]


def test_a_ticket_calls_its_done_callbacks_once_however_it_ends():
    ended = []
    with _engine(on_step=slow_step) as engine:
        finished = engine.submit("The quick", max_new_tokens=3)
        finished.add_done_callback(lambda t: ended.append((t.id, len(t.token_times), t.prompt_tokens)))
        finished.wait(10)
        finished.add_done_callback(lambda t: ended.append("at once"))  # already ended: called now
        cancelled = engine.submit("The quick", max_new_tokens=60)
        cancelled.add_done_callback(lambda t: 1 / 0)  # a broken observer harms nothing
        cancelled.add_done_callback(lambda t: ended.append(type(t.error).__name__))
        assert until(lambda: engine.occupancy() == (0, 1))
        time.sleep(0.02)
        cancelled.cancel()
        with pytest.raises(RequestAborted):
            cancelled.wait(10)
        assert cancelled.token_times  # the tokens it was given before it was cancelled
        assert len(engine.submit("Hello", max_new_tokens=2).wait(10).token_ids) == 2
    assert ended == [(finished.id, 3, len(finished.result.prompt_token_ids)), "at once", "RequestAborted"]


def test_the_cli_reports_a_runtime_failure_in_one_line_and_exits_2(monkeypatch):
    from click.testing import CliRunner

    from gptdeploy.cli import cli

    monkeypatch.setattr(OrtRuntime, "_decode", lambda self, *args: 1 / 0)
    r = CliRunner().invoke(cli, ["generate", str(made("small").bundle), "The quick", "--backend", "ort",
                                 "--threads", "1", "--max-new-tokens", "4"])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith("error: ") and "ZeroDivisionError" in lines[0]
