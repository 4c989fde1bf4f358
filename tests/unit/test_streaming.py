"""The lean streaming path's pure parts: batching across the Ray hop, incremental
detokenization as vLLM does it, and the SSE encoder."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from runtime.detokenizer import IncrementalDetokenizer
from runtime.messages import DecodeChunk
from runtime.openai_api import StreamEncoder
from runtime.streaming import coalesce


async def _source(gaps_s: list[float], final_at: int | None = None, fail_at: int | None = None):
    for i, gap in enumerate(gaps_s):
        await asyncio.sleep(gap)
        if i == fail_at:
            raise RuntimeError("engine died")
        yield DecodeChunk((i,), "length" if i == final_at else None,
                          object() if i == final_at else None)  # type: ignore[arg-type]


async def _collect(stream) -> list[tuple[float, DecodeChunk]]:
    start, out = time.perf_counter(), []
    async for chunk in stream:
        out.append((time.perf_counter() - start, chunk))
    return out


def _batched(source, interval_s: float):
    return coalesce(source, interval_s, DecodeChunk.merged, lambda c: c.is_final)


def test_coalesce_sends_the_first_at_once_then_one_message_per_interval():
    # 1. twenty tokens 10 ms apart, batched at 50 ms
    out = asyncio.run(_collect(_batched(_source([0.01] * 20, final_at=19), 0.05)))
    chunks = [c for _, c in out]
    # 2. nothing lost, in order, and the end kept
    assert [t for c in chunks for t in c.token_ids] == list(range(20))
    assert chunks[-1].finish_reason == "length" and chunks[-1].is_final
    # 3. the first message carries the first token only and left at once
    assert chunks[0].token_ids == (0,) and out[0][0] < 0.03
    # 4. far fewer messages than tokens, none closer than the interval (the last may be)
    assert len(chunks) <= 6
    gaps = [b - a for (a, _), (b, _) in zip(out, out[1:], strict=False)][:-1]
    assert all(gap >= 0.045 for gap in gaps), gaps


def test_coalesce_flushes_the_final_chunk_without_waiting_for_the_interval():
    out = asyncio.run(_collect(_batched(_source([0.0, 0.01], final_at=1), 1.0)))
    assert [c.token_ids for _, c in out] == [(0,), (1,)]
    assert out[-1][0] < 0.5  # not held for the 1 s interval


def test_coalesce_raises_the_sources_error_after_what_came_before():
    async def run():
        got = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for chunk in _batched(_source([0.0, 0.0, 0.0], fail_at=2), 0.05):
                got.extend(chunk.token_ids)
        return got

    assert asyncio.run(run()) == [0, 1]


def test_closing_the_batched_stream_closes_the_source():
    closed = asyncio.Event()

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.005)
                yield DecodeChunk((1,))
        finally:
            closed.set()

    async def run():
        stream = _batched(endless(), 0.02)
        async for _ in stream:
            break
        await stream.aclose()
        await asyncio.wait_for(closed.wait(), 1.0)

    asyncio.run(run())
    assert closed.is_set()


def test_interval_zero_passes_every_item_through():
    out = asyncio.run(_collect(_batched(_source([0.0] * 5, final_at=4), 0.0)))
    assert [c.token_ids for _, c in out] == [(i,) for i in range(5)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from runtime.tiny_model import make_tiny_model

    return AutoTokenizer.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny")))


def test_detokenizer_holds_back_split_characters_and_never_emits_replacements(tokenizer):
    text = "héllo wörld 日本 🎉!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[70, 71])
    deltas = [detok.push([t]) for t in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    # a character's first bytes give "", its last byte gives the whole character
    assert deltas[:3] == ["h", "", "é"]
    # an output that stops inside a character holds the partial bytes back
    cut = IncrementalDetokenizer(tokenizer, prompt_ids=[70])
    assert cut.push(tokenizer("a日", add_special_tokens=False)["input_ids"][:-1]) == "a"


def test_slow_tokenizer_path_gives_the_same_text(tokenizer):
    class Slow:
        def decode(self, ids, skip_special_tokens=True):
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    text = "naïve café ✓ done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    fast, slow = IncrementalDetokenizer(tokenizer, [70]), IncrementalDetokenizer(Slow(), [70])
    fast_deltas = [fast.push([t]) for t in ids]
    slow_deltas = [slow.push([t]) for t in ids]
    assert "".join(slow_deltas) == "".join(fast_deltas) == text


@pytest.mark.parametrize("chat", [False, True])
def test_stream_encoder_text_chunks_are_the_openai_chunk_json(chat):
    encoder = StreamEncoder("req-1", "tiny", chat)
    event = encoder.text(0, 'a "quoted"\n\u2028 text', first=True)
    assert event.startswith("data: ") and event.endswith("\n\n")
    body = json.loads(event[len("data: "):])
    assert body["id"] == "req-1" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["finish_reason"] is None and choice["index"] == 0
    if chat:
        assert body["object"] == "chat.completion.chunk"
        assert choice["delta"] == {"role": "assistant", "content": 'a "quoted"\n\u2028 text'}
        later = json.loads(encoder.text(2, "x", first=False)[len("data: "):])
        assert later["choices"][0]["index"] == 2
        assert later["choices"][0]["delta"] == {"content": "x"}
    else:
        assert body["object"] == "text_completion"
        assert choice["text"] == 'a "quoted"\n\u2028 text'


class _FlakyTransfer:
    """Execution's engine side for one request: the first `failures` tries fail their KV
    transfer before any token; later tries stream two tokens and finish."""

    def __init__(self, tokenizer, failures: int) -> None:
        from types import SimpleNamespace

        self.failures = failures
        self.tries: list[str] = []
        server = SimpleNamespace(request_timeout_s=5.0)
        self.router = SimpleNamespace(config=SimpleNamespace(server=server), live=None,
                                      tokenizer=tokenizer, redecide=self._redecide)

    @staticmethod
    def _redecide(prepared, num_retry):
        from dataclasses import replace

        request = replace(prepared.request, request_id=f"{prepared.request.request_id}-r")
        return replace(prepared, request=request)

    def events(self, prepared):
        from runtime.messages import KVTransferFailed, StreamEvent

        self.tries.append(prepared.request.request_id)

        async def run():
            if len(self.tries) <= self.failures:
                raise KVTransferFailed("transfer handle at 127.0.0.1:1 no longer valid\n"
                                       "  File ... (a remote traceback)")
            yield StreamEvent((70,))
            yield StreamEvent((71,), "length")

        return run()


def _execute(tokenizer, failures: int) -> tuple[_FlakyTransfer, list, BaseException | None]:
    from runtime.execution import Execution
    from runtime.messages import PreparedRequest
    from runtime.metrics import Metrics
    from runtime.requests import GenerateRequest, SamplingSpec

    flaky = _FlakyTransfer(tokenizer, failures)
    execution = Execution(flaky.router, Metrics())  # type: ignore[arg-type]
    execution._events = flaky.events  # type: ignore[method-assign]
    prepared = PreparedRequest(GenerateRequest("cmpl-1", (1, 2, 3), SamplingSpec(max_tokens=2)),
                               "short", time.perf_counter())

    async def run():
        events, error = [], None
        try:
            async for event in execution.stream(prepared):
                events.append(event)
        except Exception as err:  # noqa: BLE001 - returned for the test to inspect
            error = err
        return events, error

    events, error = asyncio.run(run())
    return flaky, events, error


def test_a_failed_kv_transfer_before_the_first_token_is_retried(tokenizer):
    flaky, events, error = _execute(tokenizer, failures=1)
    assert error is None
    assert [t for e in events for t in e.token_ids] == [70, 71]
    assert len(flaky.tries) == 2 and flaky.tries[1] != flaky.tries[0]  # a new request id


def test_a_kv_transfer_failing_every_try_is_a_clean_retryable_503(tokenizer):
    from runtime.execution import MAX_RETRIES
    from runtime.openai_api import APIError

    flaky, events, error = _execute(tokenizer, failures=MAX_RETRIES + 1)
    assert events == [] and len(flaky.tries) == MAX_RETRIES + 1
    assert isinstance(error, APIError) and error.status == 503
    assert error.code == "kv_transfer_failed" and error.retry_after_s is not None
    assert "127.0.0.1" not in error.message and "File" not in error.message


def _recorded_execution(tokenizer, events, max_tokens: int):
    """An Execution streaming `events` for one request, and how many requests its metrics
    counted as done."""
    from runtime.execution import Execution
    from runtime.messages import PreparedRequest
    from runtime.metrics import Metrics
    from runtime.requests import GenerateRequest, SamplingSpec

    metrics = Metrics()
    execution = Execution(_FlakyTransfer(tokenizer, failures=0).router,  # type: ignore[arg-type]
                          metrics)
    execution._events = events  # type: ignore[method-assign]
    prepared = PreparedRequest(GenerateRequest("cmpl-1", (1, 2, 3),
                                               SamplingSpec(max_tokens=max_tokens)),
                               "short", time.perf_counter())

    def recorded() -> float:
        return metrics.registry.get_sample_value(
            "disagg_requests_total", {"lane": "short", "mode": "local", "outcome": "ok"}) or 0.0

    return execution, prepared, recorded


def test_the_bookkeeping_after_the_last_event_runs_after_the_reader_has_it(tokenizer):
    """The metrics and the scheduler's measurements of a request are taken after its last
    event reached the reader (the client's answer goes first), and finish on their own."""
    from runtime.messages import StreamEvent
    from tests.unit.test_split_costs import _timings

    async def events(prepared):
        yield StreamEvent((70,))
        yield StreamEvent((71,), "length", timings=_timings("local", 20.0))

    execution, prepared, recorded = _recorded_execution(tokenizer, events, 2)

    async def run() -> tuple[float, float]:
        seen_at_last = -1.0
        async for event in execution.stream(prepared):
            if event.timings is not None:
                seen_at_last = recorded()
        await execution.drain()
        return seen_at_last, recorded()

    at_last, after = asyncio.run(run())
    assert (at_last, after) == (0.0, 1.0)  # the reader never said: after ANSWER_GRACE_S


def test_the_bookkeeping_waits_until_the_server_says_the_answer_went_out(tokenizer,
                                                                        monkeypatch):
    from runtime import execution as execution_module
    from runtime.messages import StreamEvent
    from tests.unit.test_split_costs import _timings

    monkeypatch.setattr(execution_module, "ANSWER_GRACE_S", 600.0)

    async def events(prepared):
        yield StreamEvent((70,), "length", timings=_timings("local", 20.0))

    execution, prepared, recorded = _recorded_execution(tokenizer, events, 1)

    async def run() -> tuple[float, float]:
        async for _ in execution.stream(prepared):
            pass
        for _ in range(5):
            await asyncio.sleep(0)
        before = recorded()  # the reader is done; the response is still going out
        execution.answered("cmpl-1")
        await execution.drain()
        return before, recorded()

    assert asyncio.run(run()) == (0.0, 1.0)


def test_the_scheduler_counts_the_tokens_a_request_generated_until_it_ends(tokenizer):
    """The ingress reports each token to the scheduler as it streams (the tokens a sequence
    still decodes price what a prefill sent to its engine costs it) and takes them off the
    books with the request."""
    from runtime.execution import Execution
    from runtime.messages import PreparedRequest, StreamEvent
    from runtime.metrics import Metrics
    from runtime.requests import GenerateRequest, SamplingSpec
    from runtime.scheduler.live import LiveConfig, LiveScheduler
    from runtime.scheduler.policy import PolicyConfig
    from runtime.scheduler.types import ReplicaReport
    from tests.unit.test_split_costs import _timings

    live = LiveScheduler(LiveConfig(PolicyConfig(disaggregation=False), 0, 16, 8))
    live.report(ReplicaReport("decode", "d0", 0, 1000, 1000, 16, 0, 8, time.time()))
    flaky = _FlakyTransfer(tokenizer, failures=0)
    flaky.router.live = live
    execution = Execution(flaky.router, Metrics())  # type: ignore[arg-type]
    left: list[float] = []

    async def events(prepared):
        for token in (70, 71, 72):
            yield StreamEvent((token,))
            left.append(float(live.decode.tokens_left()[0]))  # the reader has the token
        yield StreamEvent((73,), "length", timings=_timings("local", 20.0))

    execution._events = events  # type: ignore[method-assign]
    decision = live.decide("cmpl-1", 3, 8)
    prepared = PreparedRequest(GenerateRequest("cmpl-1", (1, 2, 3), SamplingSpec(max_tokens=8)),
                               "short", time.perf_counter(), decision)

    async def run() -> None:
        async for _ in execution.stream(prepared):
            pass
        await execution.drain()

    assert float(live.decode.tokens_left()[0]) == 8.0
    asyncio.run(run())
    assert left == [7.0, 6.0, 5.0]
    assert float(live.decode.decoded_tokens[0]) == 0.0  # gone with the request
    assert float(live.decode.booked_max_tokens[0]) == 0.0
