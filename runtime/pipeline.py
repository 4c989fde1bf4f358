"""One request, disaggregated: prefill on one engine, KV handoff, decode on another.

  1. PrefillWorker computes the prompt and the first token; the first token is emitted at once
     (TTFT does not include the KV transfer).
  2. DecodeWorker pulls the prompt's KV blocks and streams the remaining tokens.
     Overlap (when both sides support it): the pipeline mints a stream handle and, while the
     prefill runs, has the decode worker prefetch the blocks layer by layer as the producer
     computes them; the decode request then finds them staged and waits only for the rest.
  3. The last event carries the request's latency split by phase.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kv_transfer.params import TransferParams
from runtime.cost import RequestCost
from runtime.logprobs import TokenLogprobs
from runtime.messages import (
    DecodeChunk,
    DecodeTimings,
    Lane,
    Mode,
    PhaseTimings,
    PrefillResult,
    StreamEvent,
)
from runtime.requests import GenerateRequest


@dataclass(frozen=True)
class Completion:
    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    timings: PhaseTimings
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, if the request asked


class PrefillClient(Protocol):
    """A PrefillWorker, or a handle to one in another process."""

    async def prefill(self, request: GenerateRequest, target: str = "") -> PrefillResult: ...

    async def release(self, transfer: TransferParams) -> None: ...


class DecodeClient(Protocol):
    """A DecodeWorker, or a handle to one in another process."""

    def decode(
        self, request: GenerateRequest, first_token_id: int | None,
        transfer: TransferParams | None, *, target: str = "",
    ) -> AsyncIterator[DecodeChunk]: ...


@runtime_checkable
class StreamingPrefillClient(Protocol):
    """A prefill client that can serve a prompt's KV while computing it (overlap)."""

    async def prefill(self, request: GenerateRequest, target: str = "",
                      stream_handle: str = "") -> PrefillResult: ...

    async def release(self, transfer: TransferParams) -> None: ...

    async def kv_endpoint(self, target: str = "") -> str: ...


@runtime_checkable
class PrefetchingDecodeClient(Protocol):
    """A decode client that can pull a prompt's KV while it is being prefilled (overlap)."""

    def decode(
        self, request: GenerateRequest, first_token_id: int | None,
        transfer: TransferParams | None, *, target: str = "",
    ) -> AsyncIterator[DecodeChunk]: ...

    async def prefetch(self, endpoint: str, stream_handle: str, num_tokens: int,
                       target: str = "") -> bool: ...

    async def cancel_prefetch(self, stream_handle: str, target: str = "") -> None: ...


class DisaggPipeline:
    """`overlap`: move the KV during the prefill where both clients support it (else the
    decode worker pulls after the prefill)."""

    def __init__(self, prefill: PrefillClient, decode: DecodeClient,
                 overlap: bool = False) -> None:
        self.prefill = prefill
        self.decode = decode
        self.overlap = overlap

    async def stream(
        self, request: GenerateRequest, arrival_s: float | None = None, lane: Lane = "short",
        prefill_target: str = "", decode_target: str = "",
    ) -> AsyncIterator[StreamEvent]:
        """Events: the first token, then decode chunks; the last carries the timings.
        arrival_s (time.perf_counter) is when the request reached the ingress."""
        start = time.perf_counter()
        arrival = start if arrival_s is None else arrival_s
        queue_ms = (start - arrival) * 1e3
        stream_handle, prefetching = await self._start_prefetch(request, prefill_target,
                                                                decode_target)
        try:
            first = await self._prefill(request, prefill_target, stream_handle)
        except BaseException:
            await self._end_prefetch(stream_handle, decode_target, prefetching)
            raise
        if prefetching is not None and not await _settled(prefetching):
            stream_handle = ""  # refused or failed: the decode pulls after the prefill
        ttft_ms = (time.perf_counter() - arrival) * 1e3
        first_event = StreamEvent((first.first_token_id,), logprobs=(
            (first.first_logprobs,) if first.first_logprobs is not None else ()))
        if first.finish_reason is not None:
            await self._end_prefetch(stream_handle, decode_target)
            yield first_event
            timings = self._timings(first, None, ttft_ms, arrival, 1, queue_ms, lane)
            yield StreamEvent((), first.finish_reason, timings, first.stop_reason)
            return
        num_tokens = 1
        decoding = False
        try:
            yield first_event
            async for chunk in self.decode.decode(request, first.first_token_id, first.transfer,
                                                  target=decode_target):
                decoding = True
                num_tokens += len(chunk.token_ids)
                phases = None
                if chunk.timings is not None:
                    phases = self._timings(first, chunk.timings, ttft_ms, arrival, num_tokens,
                                           queue_ms, lane)
                yield StreamEvent(chunk.token_ids, chunk.finish_reason, phases,
                                  chunk.stop_reason, chunk.logprobs)
        finally:
            # A prefetch the decode did not claim (failed, or a local prefix-cache hit) is
            # dropped now rather than at its expiry; a claimed one is gone already (no-op).
            await self._end_prefetch(stream_handle, decode_target)
            if not decoding and first.transfer is not None:
                # Client gone or decode failed before the decode engine took over the blocks:
                # free them now rather than at lease expiry (a second release is a no-op).
                await self.prefill.release(first.transfer)

    async def _start_prefetch(self, request: GenerateRequest, prefill_target: str,
                              decode_target: str) -> tuple[str, asyncio.Task[bool] | None]:
        """Overlap: start the decode worker's prefetch, and return its stream handle and the
        call that starts it, without waiting for it: the prefill goes out at once (a
        prefetch that reaches the producer after the prefill still reads the stream, which
        stays readable under the lease). ('', None): no overlap (off, unsupported, or nothing
        to hand off)."""
        if not (self.overlap and request.sampling.max_tokens > 1
                and isinstance(self.prefill, StreamingPrefillClient)
                and isinstance(self.decode, PrefetchingDecodeClient)):
            return "", None
        stream_handle = secrets.token_urlsafe(24)
        endpoint = await self.prefill.kv_endpoint(prefill_target)
        prefetching = asyncio.ensure_future(self.decode.prefetch(
            endpoint, stream_handle, len(request.prompt_token_ids), decode_target))
        return stream_handle, prefetching

    async def _prefill(self, request: GenerateRequest, target: str,
                       stream_handle: str) -> PrefillResult:
        if stream_handle:
            assert isinstance(self.prefill, StreamingPrefillClient)
            return await self.prefill.prefill(request, target, stream_handle=stream_handle)
        return await self.prefill.prefill(request, target)

    async def _end_prefetch(self, stream_handle: str, decode_target: str,
                            prefetching: asyncio.Task[bool] | None = None) -> None:
        if prefetching is not None and not await asyncio.shield(_settled(prefetching)):
            return  # never started: nothing to cancel
        if stream_handle:
            assert isinstance(self.decode, PrefetchingDecodeClient)
            await asyncio.shield(self.decode.cancel_prefetch(stream_handle, decode_target))

    async def stream_local(
        self, request: GenerateRequest, arrival_s: float, lane: Lane, decode_target: str,
        mode: Mode = "local",
    ) -> AsyncIterator[StreamEvent]:
        """Local mode: one replica prefills the prompt and decodes (no KV transfer): a decode
        replica, or in prefill_local mode a prefill replica (the decode client is then the
        prefill pool's)."""
        queue_ms = (time.perf_counter() - arrival_s) * 1e3
        ttft_ms = 0.0
        num_tokens = 0
        async for chunk in self.decode.decode(request, None, None, target=decode_target):
            if num_tokens == 0 and chunk.token_ids:
                ttft_ms = (time.perf_counter() - arrival_s) * 1e3
            num_tokens += len(chunk.token_ids)
            timings = None
            if chunk.timings is not None:
                d = chunk.timings
                e2e_ms = (time.perf_counter() - arrival_s) * 1e3
                timings = PhaseTimings(
                    scheduler_queue_ms=queue_ms, prefill_queue_ms=d.queue_ms,
                    prefill_compute_ms=max(0.0, d.first_token_ms - d.queue_ms),
                    kv_transfer_ms=0.0, kv_transfer_bytes=0, decode_queue_ms=0.0,
                    decode_compute_ms=d.decode_ms, ttft_ms=ttft_ms,
                    tpot_ms=(e2e_ms - ttft_ms) / (num_tokens - 1) if num_tokens > 1 else 0.0,
                    e2e_ms=e2e_ms, num_prompt_tokens=len(request.prompt_token_ids),
                    num_output_tokens=num_tokens, num_loaded_tokens=0,
                    num_decode_computed_prompt_tokens=d.num_computed_prompt_tokens,
                    num_cached_prompt_tokens=max(0, len(request.prompt_token_ids)
                                                 - d.num_computed_prompt_tokens),
                    lane=lane, mode=mode, prefill_replica="", decode_replica=d.worker_id,
                    cost=d.cost,
                )
            yield StreamEvent(chunk.token_ids, chunk.finish_reason, timings, chunk.stop_reason,
                              chunk.logprobs, chunk.prompt_logprobs)

    async def generate(self, request: GenerateRequest) -> Completion:
        tokens: list[int] = []
        logprobs: list[TokenLogprobs] = []
        async for event in self.stream(request):
            tokens.extend(event.token_ids)
            logprobs.extend(event.logprobs)
            if event.timings is not None:
                return Completion(request.request_id, tuple(tokens), event.finish_reason,
                                  event.timings, tuple(logprobs))
        raise AssertionError("stream ended without timings")

    @staticmethod
    def _timings(
        first: PrefillResult,
        decode: DecodeTimings | None,
        ttft_ms: float,
        arrival: float,
        num_tokens: int,
        queue_ms: float,
        lane: Lane,
    ) -> PhaseTimings:
        e2e_ms = (time.perf_counter() - arrival) * 1e3
        tpot_ms = (e2e_ms - ttft_ms) / (num_tokens - 1) if num_tokens > 1 else 0.0
        decode_compute_ms = 0.0
        if decode is not None:
            first_step_ms = decode.first_token_ms - decode.transfer_exposed_ms - decode.queue_ms
            decode_compute_ms = max(0.0, first_step_ms) + decode.decode_ms
        return PhaseTimings(
            scheduler_queue_ms=queue_ms,
            prefill_queue_ms=first.timings.queue_ms,
            prefill_compute_ms=first.timings.compute_ms,
            kv_transfer_ms=decode.transfer_ms if decode else 0.0,
            kv_transfer_bytes=decode.transfer_bytes if decode else 0,
            decode_queue_ms=decode.queue_ms if decode else 0.0,
            decode_compute_ms=decode_compute_ms,
            ttft_ms=ttft_ms,
            tpot_ms=tpot_ms,
            e2e_ms=e2e_ms,
            num_prompt_tokens=first.num_prompt_tokens,
            num_output_tokens=num_tokens,
            num_loaded_tokens=decode.num_loaded_tokens if decode else 0,
            num_decode_computed_prompt_tokens=(
                decode.num_computed_prompt_tokens if decode else 0
            ),
            num_cached_prompt_tokens=first.num_cached_tokens,
            lane=lane,
            prefill_replica=first.worker_id,
            decode_replica=decode.worker_id if decode else "",
            transfer_error=decode.transfer_error if decode else "",
            kv_transfer_exposed_ms=decode.transfer_exposed_ms if decode else 0.0,
            kv_transfer_overlapped=decode.transfer_overlapped if decode else False,
            cost=handoff_cost(first, decode),
        )


def handoff_cost(first: PrefillResult, decode: DecodeTimings | None) -> RequestCost:
    """Both engines' shares, the bytes moved, and the prompt's blocks under the producer's
    lease: from the prefill's end until the decode engine had them (its queue and the part
    of the transfer it waited for; the hop between the two is not counted)."""
    if decode is None:
        return first.cost
    lease_s = (decode.queue_ms + decode.transfer_exposed_ms) / 1e3
    num_blocks = len(first.transfer.block_ids) if first.transfer is not None else 0
    return first.cost + decode.cost + RequestCost(prefill_kv_block_s=num_blocks * lease_s,
                                                  bytes_moved=decode.transfer_bytes)


async def _settled(prefetching: asyncio.Task[bool]) -> bool:
    """Whether the decode replica started the prefetch (False if the call failed: the decode
    then pulls the KV after the prefill, or fails on its own if the replica is gone)."""
    try:
        return await prefetching
    except Exception:  # noqa: BLE001 - any failure means: no prefetch
        return False
