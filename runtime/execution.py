"""Running one prepared request on the replicas its decision names (the ingress side).

Lifecycle of one request:
  1. `stream` runs it in a task of its own, under its deadline (server.request_timeout_s), so
     the deadline or a replica's failure ends it cleanly whatever its reader is doing;
  2. each try (`_attempt`) waits for its turn (a long prompt: one per engine at a time), then
     turns the pipeline's token ids into text (OutputText: vLLM's detokenizer and stop string
     rules), books the first token and the measured prefill with the scheduler, and releases
     its booking however it ends;
  3. a replica that fails before the first token is taken out and the request re-decided and
     tried elsewhere (MAX_RETRIES); after it, the request ends with a retryable 503;
  4. a stop string found here before the engine stopped (it can span the first token, which
     the decode engine never saw as text) ends the request here: the engine is given a moment
     to finish on its own, then aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING

from runtime.clients import ReplicaFailed
from runtime.detokenizer import IncrementalDetokenizer
from runtime.logprobs import TokenLogprobs
from runtime.messages import InvalidRequest, KVTransferFailed, PreparedRequest, TextEvent
from runtime.metrics import Metrics
from runtime.openai_api import APIError
from runtime.pipeline import Lane, PhaseTimings, StreamEvent
from runtime.scheduler.types import Engine, Rejection
from runtime.stops import OutputText

if TYPE_CHECKING:
    from runtime.router import Router

log = logging.getLogger(__name__)

MAX_RETRIES = 2  # tries on other replicas after a replica failed before the first token
STOP_GRACE_S = 1.0  # after a stop string: how long the engine may take to stop on its own
# after the reader took the last event: how long the bookkeeping waits at most for the
# server to say that the answer went out (`answered`)
ANSWER_GRACE_S = 0.05


class Execution:
    def __init__(self, router: Router, metrics: Metrics) -> None:
        self.router = router
        self.metrics = metrics
        self._tails: set[asyncio.Future[None]] = set()  # producers finishing their bookkeeping
        self._answered: dict[str, asyncio.Event] = {}  # by request id, while it streams

    async def stream(self, prepared: PreparedRequest) -> AsyncIterator[TextEvent]:
        """The request's events; the last one carries its timings. The bookkeeping after it
        (metrics, the scheduler's measurements, releasing the replicas' stream) runs in the
        producer task once the answer is out: when the server says so (`answered`: the
        response sent, gRPC's final status handed on), at the latest ANSWER_GRACE_S after
        the reader took the last event. Run right after the reader had it, it held up the
        response's last bytes: in router_overhead's one-token requests the client waited
        0.3-0.6 ms less with the bookkeeping 5 ms later."""
        queue: asyncio.Queue[TextEvent | BaseException | None] = asyncio.Queue()
        request_id = prepared.request.request_id
        answered = self._answered[request_id] = asyncio.Event()
        producer = asyncio.ensure_future(self._produce(prepared, queue, answered))
        producer.add_done_callback(lambda _: self._answered.pop(request_id, None))
        last = False
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                last = item.timings is not None
                if last:  # the bookkeeping waits for the answer to go out, this long at most
                    asyncio.get_running_loop().call_later(ANSWER_GRACE_S, answered.set)
                yield item
                if last:
                    return
        finally:
            if last and not producer.done():  # it finishes the bookkeeping on its own
                self._tails.add(producer)
                producer.add_done_callback(self._tails.discard)
            else:
                if not producer.done():
                    producer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producer

    def answered(self, request_id: str) -> None:
        """The server sent the request's answer: its bookkeeping may run now."""
        if (event := self._answered.get(request_id)) is not None:
            event.set()

    async def drain(self) -> None:
        """Wait for the bookkeeping of the requests already answered (the tests use it)."""
        while self._tails:
            await asyncio.gather(*self._tails, return_exceptions=True)

    async def _produce(self, prepared: PreparedRequest,
                       queue: asyncio.Queue[TextEvent | BaseException | None],
                       answer_out: asyncio.Event) -> None:
        timeout_s = self.router.config.server.request_timeout_s
        answered = False
        try:
            async with asyncio.timeout(timeout_s):
                async for event in self._run(prepared):
                    queue.put_nowait(event)
                    if event.timings is not None:
                        answered = True
                        await answer_out.wait()  # the client has its answer first
            queue.put_nowait(None)
        except TimeoutError:
            self.metrics.timeouts.inc()
            queue.put_nowait(APIError(504, f"the request did not finish within its deadline "
                                      f"of {timeout_s:g} s (server.request_timeout_s)",
                                      code="timeout"))
        except Exception as err:  # noqa: BLE001 - handed to the reader, raised there
            if answered:  # no reader any more
                log.exception("request %s: bookkeeping after its answer failed",
                              prepared.request.request_id)
            queue.put_nowait(err)

    async def _run(self, prepared: PreparedRequest) -> AsyncIterator[TextEvent]:
        attempt, sent = prepared, False
        for retry in range(MAX_RETRIES + 1):
            try:
                async for event in self._attempt(attempt, retry):
                    sent = True
                    yield event
                return
            except ReplicaFailed as err:
                self.metrics.replica_failures.labels(role=err.role).inc()
                if self.router.live is not None:
                    self.router.live.replica_failed(err.role, err.replica_id)
                if sent or retry == MAX_RETRIES:
                    raise APIError(503, "the replica serving this request failed"
                                   + (" after it started streaming" if sent else "")
                                   + "; the request can be retried",
                                   code="replica_failed", retry_after_s=1.0) from err
                self.metrics.retries.inc()
                attempt = self.router.redecide(prepared, retry + 1)
            except InvalidRequest as err:  # the engine refused the request's parameters
                raise APIError(400, str(err)) from err
            except KVTransferFailed as err:  # the replicas are alive: the prompt runs again
                log.warning("request %s: KV transfer failed (try %d): %s",
                            prepared.request.request_id, retry + 1, _first_line(err))
                if sent or retry == MAX_RETRIES:
                    raise APIError(503, "the KV cache transfer for this request failed; the "
                                   "request can be retried", code="kv_transfer_failed",
                                   retry_after_s=1.0) from err
                self.metrics.retries.inc()
                attempt = self.router.redecide(prepared, retry + 1)

    def _events(self, prepared: PreparedRequest) -> AsyncIterator[StreamEvent]:
        router, decision, request = self.router, prepared.decision, prepared.request
        lane: Lane = decision.lane if decision else prepared.lane
        if decision is None and request.sampling.one_engine:
            return router.pipeline.stream_local(request, prepared.arrival_s, lane, "")
        if decision is None:
            return router.pipeline.stream(request, prepared.arrival_s, lane)
        if decision.mode == "local":
            return router.pipeline.stream_local(request, prepared.arrival_s, lane,
                                                decision.decode_replica)
        if decision.mode == "prefill_local":
            assert decision.prefill_replica is not None
            return router.prefill_only.stream_local(request, prepared.arrival_s, lane,
                                                    decision.prefill_replica, "prefill_local")
        return router.overlapped.stream(request, prepared.arrival_s, lane,
                                        prefill_target=decision.prefill_replica or "",
                                        decode_target=decision.decode_replica)

    async def _attempt(self, prepared: PreparedRequest,
                       num_retries: int) -> AsyncIterator[TextEvent]:
        decision, request = prepared.decision, prepared.request
        sampling = request.sampling
        lane: Lane = decision.lane if decision else prepared.lane
        live = self.router.live if decision is not None else None
        output = OutputText(IncrementalDetokenizer(self.router.tokenizer,
                                                   request.prompt_token_ids,
                                                   sampling.skip_special_tokens),
                            sampling.stop, sampling.min_tokens,
                            sampling.include_stop_str_in_output)
        self.metrics.in_flight.labels(lane=lane).inc()
        clean: bool | None = None  # the prompt ran alone on its engine
        first_token_at: float | None = None
        prompt_logprobs: tuple[TokenLogprobs, ...] | None = None
        tpot_ms = 0.0
        num_output_tokens = 0  # of a request that ran to its end (none: it did not)
        num_progressed = 0  # its tokens so far, as reported to the scheduler
        events: AsyncIterator[StreamEvent] | None = None
        try:
            if live is not None:
                assert decision is not None
                turn = await live.turn(decision, request.request_id,  # scheduler queue time
                                       len(request.prompt_token_ids), sampling.max_tokens,
                                       sampling.one_engine)
                if isinstance(turn, Rejection):  # moved, and nothing takes it: booked nowhere
                    live = None
                    raise APIError(503, f"no replica can serve the request now ({turn.reason})"
                                   "; retry shortly", code="unavailable",
                                   retry_after_s=max(1.0, turn.retry_after_s))
                if Engine.of(turn) != Engine.of(decision):  # it moved while it waited
                    self.metrics.moved.inc()
                if turn is not decision:
                    decision = turn
                    prepared = replace(prepared, decision=decision)
            events = self._events(prepared)
            while True:
                try:
                    event = await (asyncio.wait_for(anext(events), STOP_GRACE_S)
                                   if output.stop_reason else anext(events))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:  # stopped here; the engine went on: abort it
                    timings = self._stopped_timings(prepared, first_token_at, output)
                    self.metrics.record(timings)
                    yield TextEvent(output.finish(), (), "stop", timings, output.stop_reason)
                    return
                if first_token_at is None and event.token_ids:
                    first_token_at = time.perf_counter()
                    if live is not None:
                        assert decision is not None
                        clean = live.first_token(decision, request.request_id)
                if live is not None and event.token_ids:
                    assert decision is not None
                    live.progressed(decision, len(event.token_ids), sampling.max_tokens)
                    num_progressed += len(event.token_ids)
                kept, text = output.push(event.token_ids)
                logprobs = event.logprobs[:len(kept)]  # none after a stop string
                if event.prompt_logprobs is not None:
                    prompt_logprobs = event.prompt_logprobs  # goes with the next event out
                if event.timings is None:
                    if text or kept:
                        yield TextEvent(text, kept, logprobs=logprobs,
                                        prompt_logprobs=prompt_logprobs)
                        prompt_logprobs = None
                    continue
                t = self._final_timings(prepared, event.timings, num_retries, output)
                tpot_ms, num_output_tokens = t.tpot_ms, t.num_output_tokens
                stopped = output.stop_reason is not None
                yield TextEvent(text + output.finish(), kept,
                                "stop" if stopped else event.finish_reason, t,
                                output.stop_reason if stopped else event.stop_reason, logprobs,
                                prompt_logprobs)
                self.metrics.record(t)  # after the client has its answer (stream)
                if live is not None:
                    assert decision is not None
                    live.prefill_measured(decision,
                                          t.num_prompt_tokens - t.num_cached_prompt_tokens,
                                          t.prefill_compute_ms, clean)
                    live.handoff_measured(t, clean)
                return
        except KVTransferFailed:
            self.metrics.record_failure(lane, "disaggregated", "transfer_failed")
            raise
        finally:
            aclose = getattr(events, "aclose", None) if events is not None else None
            if aclose is not None:
                await aclose()  # a stop here, or a failure: the replicas drop the request
            self.metrics.in_flight.labels(lane=lane).dec()
            if live is not None:
                assert decision is not None
                live.request_done(decision, request.request_id, len(request.prompt_token_ids),
                                  sampling.max_tokens, tpot_ms, num_output_tokens,
                                  num_progressed)

    @staticmethod
    def _final_timings(prepared: PreparedRequest, timings: PhaseTimings, num_retries: int,
                       output: OutputText) -> PhaseTimings:
        decision = prepared.decision
        extra: dict[str, object] = {"num_retries": num_retries}
        if decision is not None:
            extra.update(decision_reason=decision.reason,
                         predicted_prefill_ms=decision.predicted_prefill_ms,
                         predicted_ttft_ms=decision.predicted_ttft_ms,
                         degraded=decision.reason.startswith("degraded"))
        if output.stop_reason is not None:  # tokens after the stop string are not output
            extra["num_output_tokens"] = len(output.token_ids)
        return replace(timings, **extra)  # type: ignore[arg-type]

    @staticmethod
    def _stopped_timings(prepared: PreparedRequest, first_token_at: float | None,
                         output: OutputText) -> PhaseTimings:
        """Timings of a request this side ended on a stop string: what the ingress saw (the
        engines' own phase split never came)."""
        now = time.perf_counter()
        decision, request = prepared.decision, prepared.request
        ttft_ms = ((first_token_at or now) - prepared.arrival_s) * 1e3
        e2e_ms = (now - prepared.arrival_s) * 1e3
        n = len(output.token_ids)
        return PhaseTimings(
            scheduler_queue_ms=0.0, prefill_queue_ms=0.0, prefill_compute_ms=0.0,
            kv_transfer_ms=0.0, kv_transfer_bytes=0, decode_queue_ms=0.0,
            decode_compute_ms=0.0, ttft_ms=ttft_ms,
            tpot_ms=(e2e_ms - ttft_ms) / (n - 1) if n > 1 else 0.0, e2e_ms=e2e_ms,
            num_prompt_tokens=len(request.prompt_token_ids), num_output_tokens=n,
            num_loaded_tokens=0, num_decode_computed_prompt_tokens=0,
            lane=decision.lane if decision else prepared.lane,
            mode=decision.mode if decision else "disaggregated",
            prefill_replica=decision.prefill_replica or "" if decision else "",
            decode_replica=decision.decode_replica if decision else "",
            decision_reason=(decision.reason if decision else "")
            + "; ended by a stop string at the ingress",
        )


def _first_line(err: BaseException) -> str:
    """An error's own message: a Ray task error's text is the remote traceback; its last
    line names the cause."""
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else type(err).__name__
