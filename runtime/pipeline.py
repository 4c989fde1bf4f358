"""One request, disaggregated: prefill on one engine, KV handoff, decode on another.

  1. PrefillWorker computes the prompt and the first token; the first token is emitted at once
     (TTFT does not include the KV transfer).
  2. DecodeWorker pulls the prompt's KV blocks and streams the remaining tokens.
  3. The last event carries the request's latency split by phase.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from decode_workers.worker import DecodeTimings, DecodeWorker
from prefill_workers.worker import PrefillResult, PrefillWorker
from runtime.requests import GenerateRequest


@dataclass(frozen=True)
class PhaseTimings:
    prefill_queue_ms: float
    prefill_compute_ms: float
    kv_transfer_ms: float
    kv_transfer_bytes: int
    decode_queue_ms: float
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    num_prompt_tokens: int
    num_output_tokens: int
    num_loaded_tokens: int
    num_decode_computed_prompt_tokens: int


@dataclass(frozen=True)
class StreamEvent:
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    timings: PhaseTimings | None = None


@dataclass(frozen=True)
class Completion:
    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    timings: PhaseTimings


class DisaggPipeline:
    def __init__(self, prefill: PrefillWorker, decode: DecodeWorker) -> None:
        self.prefill = prefill
        self.decode = decode

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamEvent]:
        start = time.perf_counter()
        first = await self.prefill.prefill(request)
        ttft_ms = (time.perf_counter() - start) * 1e3
        if first.finish_reason is not None:
            yield StreamEvent((first.first_token_id,))
            timings = self._timings(first, None, ttft_ms, start, 1)
            yield StreamEvent((), first.finish_reason, timings)
            return
        num_tokens = 1
        decoding = False
        try:
            yield StreamEvent((first.first_token_id,))
            async for chunk in self.decode.decode(request, first.first_token_id, first.transfer):
                decoding = True
                num_tokens += len(chunk.token_ids)
                phases = None
                if chunk.timings is not None:
                    phases = self._timings(first, chunk.timings, ttft_ms, start, num_tokens)
                yield StreamEvent(chunk.token_ids, chunk.finish_reason, phases)
        finally:
            if not decoding and first.transfer is not None:
                # Client gone or decode failed before the decode engine took over the blocks:
                # free them now rather than at lease expiry (a second release is a no-op).
                await self.prefill.release(first.transfer)

    async def generate(self, request: GenerateRequest) -> Completion:
        tokens: list[int] = []
        async for event in self.stream(request):
            tokens.extend(event.token_ids)
            if event.timings is not None:
                return Completion(request.request_id, tuple(tokens), event.finish_reason,
                                  event.timings)
        raise AssertionError("stream ended without timings")

    @staticmethod
    def _timings(
        first: PrefillResult,
        decode: DecodeTimings | None,
        ttft_ms: float,
        start: float,
        num_tokens: int,
    ) -> PhaseTimings:
        e2e_ms = (time.perf_counter() - start) * 1e3
        tpot_ms = (e2e_ms - ttft_ms) / (num_tokens - 1) if num_tokens > 1 else 0.0
        return PhaseTimings(
            prefill_queue_ms=first.timings.queue_ms,
            prefill_compute_ms=first.timings.compute_ms,
            kv_transfer_ms=decode.transfer_ms if decode else 0.0,
            kv_transfer_bytes=decode.transfer_bytes if decode else 0,
            decode_queue_ms=decode.queue_ms if decode else 0.0,
            ttft_ms=ttft_ms,
            tpot_ms=tpot_ms,
            e2e_ms=e2e_ms,
            num_prompt_tokens=first.num_prompt_tokens,
            num_output_tokens=num_tokens,
            num_loaded_tokens=decode.num_loaded_tokens if decode else 0,
            num_decode_computed_prompt_tokens=(
                decode.num_computed_prompt_tokens if decode else 0
            ),
        )
