"""PrefillWorker: a vLLM engine that computes prompts and hands their KV blocks over.

Lifecycle of one request:
  1. `prefill` submits the prompt with max_tokens=1 and kv_transfer_params do_remote_decode.
  2. vLLM prefills it and samples the first token; the connector keeps the prompt's blocks
     under a lease and returns TransferParams on the finished output.
  3. The caller streams the first token to its client at once and hands the TransferParams to
     a DecodeWorker; the decode side releases the lease after pulling (or it expires).
No Ray here: the Ray Serve deployment wraps this class.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from vllm.v1.engine.exceptions import EngineDeadError

from kv_transfer.connector_worker import WorkerStats
from kv_transfer.control_client import release_handle
from kv_transfer.params import TransferParams, parse_transfer, producer_request_params
from runtime.cost_tracker import CostTracker
from runtime.engines import token_prompt
from runtime.logprobs import from_vllm as logprobs_from_vllm
from runtime.messages import PrefillResult, PrefillTimings
from runtime.requests import GenerateRequest
from runtime.seeded import UnseededRun, needs_unseeded_prefill, prefill_unseeded

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM


class PrefillWorker:
    def __init__(self, engine: AsyncLLM, auth_token: str, worker_id: str = "",
                 costs: CostTracker | None = None) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.costs = costs or CostTracker(block_size=1)  # the engine's, if it has a probe
        self._auth_token = auth_token
        self._orphan_releases: set[asyncio.Future[None]] = set()
        self._endpoint = ""
        self.dead_reason = ""  # set by engine_died
        self._died = asyncio.Event()

    async def prefill(self, request: GenerateRequest, target: str = "",
                      stream_handle: str = "") -> PrefillResult:
        """Run the prompt, return the first token and where its KV blocks wait. (`target`
        names a replica for remote clients; a local worker is its own target.) With
        stream_handle, the blocks are also served layer by layer while they are computed
        (overlap: a decode worker prefetches them by that handle).

        If the caller is cancelled (client gone), the prefill is aborted; should it have
        finished anyway, its blocks are released instead of waiting for the lease to expire.
        """
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        task = asyncio.ensure_future(self._prefill(request, stream_handle))
        died = asyncio.ensure_future(self._died.wait())
        try:
            await asyncio.wait((task, died), return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # the engine's process is gone: a replica failure, now
                task.cancel()
                raise EngineDeadError(self.dead_reason)
            return task.result()
        except asyncio.CancelledError:
            task.add_done_callback(self._release_orphan)
            await self.engine.abort(request.request_id)
            raise
        finally:
            died.cancel()

    def engine_died(self, reason: str) -> None:
        """The engine's process is gone (runtime/replica_common.EngineWatch saw it): the
        prefills waiting on it end now with EngineDeadError instead of waiting for vLLM's
        own shutdown to report it."""
        self.dead_reason = self.dead_reason or reason
        self._died.set()

    def _release_orphan(self, task: asyncio.Task[PrefillResult]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        transfer = task.result().transfer
        if transfer is not None:
            release = asyncio.ensure_future(self.release(transfer))
            self._orphan_releases.add(release)
            release.add_done_callback(self._orphan_releases.discard)

    async def _prefill(self, request: GenerateRequest, stream_handle: str) -> PrefillResult:
        start = time.perf_counter()
        hand_off = request.sampling.max_tokens > 1
        params = request.sampling.to_vllm(
            max_tokens=1,
            kv_transfer_params=producer_request_params(stream_handle) if hand_off else None,
        )
        output = None
        warm = UnseededRun()
        if needs_unseeded_prefill(self.engine, request.sampling, len(request.prompt_token_ids)):
            warm = await prefill_unseeded(self.engine, self.costs, request.request_id,
                                          list(request.prompt_token_ids), request.priority)
        self.costs.begin(request.request_id, len(request.prompt_token_ids),
                         priority=request.priority)
        try:
            async for output in self.engine.generate(
                token_prompt(request.prompt_token_ids), params,
                request_id=request.request_id, priority=request.priority,
            ):
                pass
        finally:
            cost = warm.cost + self.costs.end(request.request_id)
        assert output is not None and output.finished, "prefill ended without output"
        total_ms = (time.perf_counter() - start) * 1e3
        completion = output.outputs[0]
        if not completion.token_ids:
            raise RuntimeError(
                f"prefill of {request.request_id} produced no token "
                f"(finish_reason={completion.finish_reason})"
            )
        stopped = completion.finish_reason == "stop" or not hand_off
        transfer = parse_transfer(output.kv_transfer_params)
        if stopped and transfer is not None:
            await self.release(transfer)
            transfer = None
        queue_ms, compute_ms = _engine_phases_ms(output.metrics, total_ms)
        first_logprobs = logprobs_from_vllm(completion.logprobs, 0, 1)
        return PrefillResult(
            request_id=request.request_id,
            first_token_id=completion.token_ids[0],
            finish_reason=completion.finish_reason if stopped else None,
            transfer=transfer,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=(output.num_cached_tokens or 0) if warm.num_cached_tokens is None
            else warm.num_cached_tokens,
            timings=PrefillTimings(queue_ms, compute_ms, total_ms),
            worker_id=self.worker_id,
            stop_reason=completion.stop_reason if stopped else None,
            cost=cost,
            first_logprobs=first_logprobs[0] if first_logprobs else None,
        )

    async def release(self, transfer: TransferParams) -> None:
        """Free a handed-off prompt's blocks that no decode engine will pull (idempotent)."""
        await asyncio.to_thread(release_handle, transfer, self._auth_token)

    async def kv_endpoint(self, target: str = "") -> str:
        """Where decode workers pull this worker's blocks (host:port)."""
        if not self._endpoint:
            (self._endpoint,) = await self.engine.collective_rpc("disagg_kv_endpoint")
        return self._endpoint

    async def kv_stats(self) -> WorkerStats:
        (stats,) = await self.engine.collective_rpc("disagg_kv_stats")
        return WorkerStats.from_wire(stats)

    def shutdown(self) -> None:
        self.engine.shutdown()


def _engine_phases_ms(metrics: object, total_ms: float) -> tuple[float, float]:
    """(queue, compute) from vLLM's per-request engine timestamps, if it reported them."""
    queued = getattr(metrics, "queued_ts", 0.0)
    scheduled = getattr(metrics, "scheduled_ts", 0.0)
    first_token = getattr(metrics, "first_token_ts", 0.0)
    if not (queued and scheduled and first_token):
        return 0.0, total_ms
    return (scheduled - queued) * 1e3, (first_token - scheduled) * 1e3
