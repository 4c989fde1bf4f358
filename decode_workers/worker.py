"""DecodeWorker: a vLLM engine that continues requests whose prompts another engine computed.

Lifecycle of one request:
  1. `decode` submits prompt + first token (from the PrefillWorker) with kv_transfer_params
     do_remote_prefill and the producer's TransferParams.
  2. vLLM's scheduler asks the connector, which reports the prompt's tokens as external; the
     request waits while the connector pulls the blocks into this engine's paged cache.
  3. Only the first token (its KV is not in the producer's blocks) is computed locally, then
     decoding continues; tokens stream out as `DecodeChunk`s.
  4. The last chunk carries the timings, including the transfer's ms and bytes. If the
     transfer failed, vLLM fails the request (the engine runs kv_load_failure_policy=fail);
     then `decode` raises KVTransferFailed (`on_transfer_failure: fail`) or resubmits the
     request without TransferParams so this engine computes the prompt itself (`recompute`);
     the timings carry the transfer error either way. No token has been streamed by then.
Without TransferParams the engine prefills the prompt itself (local mode).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from vllm.exceptions import VLLMClientError
from vllm.v1.engine.exceptions import EngineDeadError

from kv_transfer.connector_worker import WorkerStats
from kv_transfer.params import (
    PrefetchSpec,
    TransferParams,
    consumer_request_params,
    parse_stats,
)
from runtime.cost_tracker import CostTracker
from runtime.engine_config import TransferFailurePolicy
from runtime.engines import token_prompt
from runtime.logprobs import TokenLogprobs, mend_continuation, prompt_from_vllm
from runtime.logprobs import from_vllm as logprobs_from_vllm
from runtime.messages import DecodeChunk, DecodeTimings, InvalidRequest, KVTransferFailed
from runtime.requests import GenerateRequest
from runtime.seeded import (
    UnseededRun,
    is_seeded_random,
    needs_unseeded_prefill,
    prefill_unseeded,
)

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM


class DecodeWorker:
    def __init__(
        self,
        engine: AsyncLLM,
        block_size: int,
        on_transfer_failure: TransferFailurePolicy = "fail",
        worker_id: str = "",
        costs: CostTracker | None = None,
    ) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.costs = costs or CostTracker(block_size)  # the engine's, if it has a probe
        self.block_size = block_size
        self.on_transfer_failure = on_transfer_failure
        # the tasks reading this engine's streams, and why the engine is dead (engine_died)
        self._streaming: set[asyncio.Task[Any]] = set()
        self.dead_reason = ""

    async def decode(
        self,
        request: GenerateRequest,
        first_token_id: int | None,
        transfer: TransferParams | None,
        on_transfer_failure: TransferFailurePolicy | None = None,
        target: str = "",
    ) -> AsyncIterator[DecodeChunk]:
        """Stream the tokens after first_token_id (all tokens when first_token_id is None).
        (`target` names a replica for remote clients; a local worker is its own target.)"""
        policy = on_transfer_failure or self.on_transfer_failure
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        task = asyncio.current_task()
        if task is not None:
            self._streaming.add(task)
        try:
            async for chunk in self._run(request, first_token_id, transfer, ""):
                yield chunk
        except KVTransferFailed as err:
            if policy != "recompute":
                raise
            retry = replace(request, request_id=f"{request.request_id}-recompute")
            async for chunk in self._run(retry, first_token_id, None, str(err)):
                yield chunk
        except asyncio.CancelledError:
            if not self.dead_reason or task is None:
                raise
            task.uncancel()  # cancelled by engine_died: the caller sees the engine's death
            raise EngineDeadError(self.dead_reason) from None
        finally:
            if task is not None:
                self._streaming.discard(task)

    def engine_died(self, reason: str) -> None:
        """The engine's process is gone (runtime/replica_common.EngineWatch saw it): every
        stream on it ends now with EngineDeadError, a replica failure the ingress retries or
        reports, instead of waiting seconds for vLLM's own shutdown to say so."""
        if self.dead_reason:
            return
        self.dead_reason = reason
        for task in list(self._streaming):
            task.cancel()

    async def _run(
        self,
        request: GenerateRequest,
        first_token_id: int | None,
        transfer: TransferParams | None,
        earlier_error: str,
    ) -> AsyncIterator[DecodeChunk]:
        if transfer is not None and transfer.block_size != self.block_size:
            raise ValueError(
                f"prefill block size {transfer.block_size} != decode block size "
                f"{self.block_size}: both pools must use the same block size"
            )
        prompt = list(request.prompt_token_ids)
        max_tokens = request.sampling.max_tokens
        # A seeded request resamples the first token here from the loaded KV (the connector
        # loads all but the prompt's last token): its generator then draws in the same order
        # as on one engine, so the seed gives the same output whichever mode ran the request
        # (a continuation would start the seed's draws again at the second token).
        resample = first_token_id is not None and transfer is not None \
            and is_seeded_random(request.sampling)
        if first_token_id is not None and not resample:
            prompt.append(first_token_id)
            max_tokens -= 1
        assert max_tokens >= 1, "nothing left to decode"
        kv_params = consumer_request_params(transfer) if transfer is not None else None
        try:
            params = request.sampling.to_vllm(max_tokens=max_tokens,
                                              kv_transfer_params=kv_params,
                                              continuation=first_token_id is not None
                                              and not resample)
        except (ValueError, VLLMClientError) as err:  # e.g. StructuredOutputsParams refusing
            raise InvalidRequest(str(err)) from err
        # what another engine sampled before this one continued (named tokens need it)
        continued = [first_token_id] if first_token_id is not None and not resample else []
        # the prompt's logprobs (echo with logprobs): computed here, sent once
        want_prompt_logprobs = params.prompt_logprobs is not None
        prompt_logprobs: tuple[TokenLogprobs, ...] | None = None
        start = time.perf_counter()
        first_token_at = None
        num_sent = 1 if resample else 0  # the resampled first token was sent already
        warm = UnseededRun()
        if transfer is None and needs_unseeded_prefill(self.engine, request.sampling,
                                                        len(prompt)):
            warm = await prefill_unseeded(self.engine, self.costs, request.request_id, prompt,
                                          request.priority)
        self.costs.begin(request.request_id, len(prompt), loads_kv=transfer is not None,
                         priority=request.priority)
        try:
            async for output in self.engine.generate(
                token_prompt(prompt), params, request_id=request.request_id,
                priority=request.priority,
            ):
                completion = output.outputs[0]
                new_tokens = tuple(completion.token_ids[num_sent:])
                new_logprobs = logprobs_from_vllm(completion.logprobs, num_sent,
                                                  len(completion.token_ids))
                if want_prompt_logprobs and output.prompt_logprobs:
                    prompt_logprobs = prompt_from_vllm(output.prompt_logprobs)
                    want_prompt_logprobs = False
                if continued and new_logprobs:
                    new_logprobs = mend_continuation(new_logprobs, num_sent, continued,
                                                     completion.token_ids, self._decode_ids)
                num_sent = len(completion.token_ids)
                if completion.token_ids and first_token_at is None:
                    first_token_at = time.perf_counter()
                    self.costs.first_token(request.request_id)
                if not output.finished:
                    if new_tokens:
                        yield DecodeChunk(new_tokens, logprobs=new_logprobs,
                                          prompt_logprobs=prompt_logprobs)
                        prompt_logprobs = None
                    continue
                stats = parse_stats(output.kv_transfer_params)
                if completion.finish_reason == "error":
                    reason = stats.error if stats and stats.error else ""
                    if not reason and transfer is not None:
                        (reason,) = await self.engine.collective_rpc(
                            "disagg_load_error", args=(request.request_id,)
                        )
                    raise KVTransferFailed(
                        f"request {request.request_id}: {reason or 'engine reported an error'}"
                    )
                end = time.perf_counter()
                first_at = first_token_at or end
                transfer_ms = stats.transfer_ms if stats else 0.0
                exposed_ms = stats.exposed_transfer_ms if stats else 0.0
                engine_queue_ms = _queue_ms(output.metrics)
                yield DecodeChunk(
                    new_tokens,
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                    logprobs=new_logprobs,
                    prompt_logprobs=prompt_logprobs,
                    timings=DecodeTimings(
                        queue_ms=max(0.0, engine_queue_ms - exposed_ms),
                        transfer_ms=transfer_ms,
                        transfer_bytes=stats.transfer_bytes if stats else 0,
                        first_token_ms=(first_at - start) * 1e3,
                        decode_ms=(end - first_at) * 1e3,
                        num_loaded_tokens=stats.num_loaded_tokens if stats else 0,
                        num_computed_prompt_tokens=len(prompt) - (
                            output.num_cached_tokens or 0 if warm.num_cached_tokens is None
                            else warm.num_cached_tokens),
                        transfer_error=earlier_error or (stats.error if stats else ""),
                        worker_id=self.worker_id,
                        transfer_exposed_ms=exposed_ms,
                        transfer_overlapped=bool(stats and stats.overlapped),
                        cost=warm.cost + self.costs.end(request.request_id),
                    ),
                )
        except (ValueError, VLLMClientError) as err:
            if first_token_at is not None or isinstance(err, InvalidRequest):
                raise
            # refused as it was added (vLLM's own checks of its parameters): the client's
            raise InvalidRequest(str(err)) from err
        finally:
            self.costs.end(request.request_id)  # a failed or abandoned one: dropped

    async def prefetch(self, endpoint: str, stream_handle: str, num_tokens: int,
                       target: str = "") -> bool:
        """Start pulling a prompt's KV from the producer at endpoint while its prefill runs
        (overlap); False if this engine skipped it (overlap off, or staging memory full): the
        decode then pulls after the prefill as usual."""
        spec = PrefetchSpec(endpoint, stream_handle, num_tokens, self.block_size)
        (started,) = await self.engine.collective_rpc("disagg_prefetch", args=(spec,))
        return bool(started)

    async def cancel_prefetch(self, stream_handle: str, target: str = "") -> None:
        """Drop a prefetch no decode request will claim (idempotent)."""
        await self.engine.collective_rpc("disagg_cancel_prefetch", args=(stream_handle,))

    async def kv_stats(self) -> WorkerStats:
        (stats,) = await self.engine.collective_rpc("disagg_kv_stats")
        return WorkerStats.from_wire(stats)

    def _decode_ids(self, token_ids: list[int]) -> str:
        return self.engine.get_tokenizer().decode(token_ids)

    def shutdown(self) -> None:
        self.engine.shutdown()


def _queue_ms(metrics: object) -> float:
    queued = getattr(metrics, "queued_ts", 0.0)
    scheduled = getattr(metrics, "scheduled_ts", 0.0)
    return (scheduled - queued) * 1e3 if queued and scheduled else 0.0
