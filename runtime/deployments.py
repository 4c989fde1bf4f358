"""Ray Serve deployments of the two worker pools, and clients that call them by handle.

The classes are thin: the engine wrappers (prefill_workers/, decode_workers/) hold the logic
and run without Ray. Each replica owns one vLLM engine; its replica id names it in timings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from ray import serve

from decode_workers.worker import DecodeChunk, DecodeWorker
from kv_transfer.connector_worker import WorkerStats
from kv_transfer.params import TransferParams
from prefill_workers.worker import PrefillResult, PrefillWorker
from runtime.app_config import AppConfig, PoolConfig
from runtime.calibration import calibrate
from runtime.engine_config import EngineConfig, EngineRole
from runtime.engine_stats import EngineLoad, LoadProbe
from runtime.engines import build_engine
from runtime.requests import GenerateRequest
from runtime.scheduler.types import ReplicaReport
from runtime.streaming import coalesce
from runtime.token_stream import TokenBatch, TokenInbox, TokenPublisher, TokenSink, merged

REPORT_PERIOD_S = 0.2


@dataclass(frozen=True)
class ReplicaStatus:
    role: str
    replica_id: str
    load: EngineLoad | None
    kv: WorkerStats


def _replica_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - outside a replica (tests)
        return "local"


def _pinned(engine: EngineConfig, pool: PoolConfig) -> EngineConfig:
    """The engine config with this replica's cores, when the pool pins replicas to cores."""
    try:
        local_rank = serve.get_replica_context().rank.local_rank
    except Exception:  # noqa: BLE001 - outside a replica, or no rank: the first entry
        local_rank = 0
    cores = pool.cores_for(local_rank)
    return engine.model_copy(update={"cpu_threads_bind": cores}) if cores else engine


async def _calibrate(engine: Any, config: AppConfig) -> tuple[tuple[int, float], ...]:
    """The engine's prefill times at a few lengths, for the scheduler's model (see
    runtime/calibration.py); nothing when scheduler.calibrate is off."""
    if not config.scheduler.calibrate:
        return ()
    model_config = engine.vllm_config.model_config
    return await calibrate(engine, model_config.max_model_len, model_config.get_vocab_size())


async def _report_loop(app_name: str, make_report: Callable[[], ReplicaReport]) -> None:
    """Tell the ingress this replica's load every REPORT_PERIOD_S (it may not exist yet)."""
    handle = None
    while True:
        await asyncio.sleep(REPORT_PERIOD_S)
        try:
            if handle is None:
                # a blocking call (it waits for the controller): keep it off the replica's
                # event loop, which serves requests meanwhile
                handle = await asyncio.to_thread(serve.get_deployment_handle, "Ingress",
                                                 app_name)
            await handle.report_load.remote(make_report())
        except Exception:  # noqa: BLE001 - the ingress is starting or restarting; retry
            handle = None
            await asyncio.sleep(1.0)


@serve.deployment
class PrefillServer:
    async def __init__(self, config: AppConfig) -> None:  # type: ignore[misc]
        self._probe = LoadProbe()
        engine = build_engine(_pinned(config.prefill_engine, config.prefill), "prefill",
                              config.transfer, probe=self._probe)
        self._worker = PrefillWorker(engine, config.transfer.auth_token.get_secret_value(),
                                     worker_id=_replica_id())
        self._pending_tokens = 0
        self._calibration = await _calibrate(engine, config)
        self._reporter = asyncio.get_running_loop().create_task(
            _report_loop(config.server.app_name, self._report))

    def _report(self) -> ReplicaReport:
        return ReplicaReport("prefill", self._worker.worker_id, self._pending_tokens, 0, 0, 0,
                             0, 0, time.time(), self._calibration)

    async def prefill(self, request: GenerateRequest, target_replica: str = "",
                      stream_handle: str = "") -> PrefillResult:
        self._pending_tokens += len(request.prompt_token_ids)
        try:
            return await self._worker.prefill(request, stream_handle=stream_handle)
        finally:
            self._pending_tokens -= len(request.prompt_token_ids)

    async def kv_endpoint(self, target_replica: str = "") -> str:
        return await self._worker.kv_endpoint()

    async def release(self, transfer: TransferParams) -> None:
        await self._worker.release(transfer)

    async def status(self) -> ReplicaStatus:
        return ReplicaStatus("prefill", self._worker.worker_id, self._probe.latest,
                             await self._worker.kv_stats())

    async def check_health(self) -> None:
        await self._worker.engine.check_health()

    def __del__(self) -> None:
        # Serve calls this on graceful replica shutdown: stop the engine's processes too.
        if "_worker" in self.__dict__:
            self._worker.shutdown()


@serve.deployment
class DecodeServer:
    async def __init__(self, config: AppConfig) -> None:  # type: ignore[misc]
        self._probe = LoadProbe()
        role: EngineRole = "decode" if config.serving == "disaggregated" else "colocated"
        engine = build_engine(_pinned(config.decode_engine, config.decode), role,
                              config.transfer, probe=self._probe)
        self._has_connector = role == "decode"
        self._worker = DecodeWorker(engine, config.decode_engine.block_size,
                                    config.transfer.on_transfer_failure,
                                    worker_id=_replica_id())
        self._num_blocks = int(engine.vllm_config.cache_config.num_gpu_blocks or 0)
        self._block_size = config.decode_engine.block_size
        self._max_num_seqs = config.decode_engine.max_num_seqs
        self._stream_interval_s = config.server.stream_interval_ms / 1e3
        self._auth_token = config.transfer.auth_token.get_secret_value()
        self._publishers: dict[str, TokenPublisher] = {}
        self._calibration = await _calibrate(engine, config)
        self._reporter = asyncio.get_running_loop().create_task(
            _report_loop(config.server.app_name, self._report))

    def _report(self) -> ReplicaReport:
        load = self._probe.latest
        usage = load.kv_cache_usage if load else 0.0
        active = (load.num_running + load.num_waiting) if load else 0
        return ReplicaReport("decode", self._worker.worker_id, 0,
                             int((1.0 - usage) * self._num_blocks), self._num_blocks,
                             self._block_size, active, self._max_num_seqs, time.time(),
                             self._calibration)

    async def decode(
        self, request: GenerateRequest, first_token_id: int | None,
        transfer: TransferParams | None, target_replica: str = "", sink: str = "",
    ) -> AsyncIterator[TokenBatch | DecodeChunk]:
        """Tokens go to the ingress's token stream at `sink` (runtime/token_stream.py); this
        call yields only what the stream could not take, as TokenBatches (batched every
        stream_interval_ms when there is no sink), then the final chunk with every token.
        A caller that stops reading cancels this generator; vLLM then aborts the request."""
        publisher = self._publisher(sink) if sink else None
        chunks = self._worker.decode(request, first_token_id, transfer)
        if publisher is None:
            chunks = coalesce(chunks, self._stream_interval_s, DecodeChunk.merged,
                              lambda chunk: chunk.is_final)
        tokens: list[int] = []
        async for chunk in chunks:
            start = len(tokens)
            tokens.extend(chunk.token_ids)
            if chunk.is_final:
                yield replace(chunk, token_ids=tuple(tokens))
                return
            if publisher is None or not publisher.publish(request.request_id, start,
                                                          chunk.token_ids):
                yield TokenBatch(start, chunk.token_ids)

    def _publisher(self, address: str) -> TokenPublisher:
        publisher = self._publishers.get(address)
        if publisher is None:
            publisher = self._publishers[address] = TokenPublisher(address, self._auth_token)
        return publisher

    async def prefetch(self, endpoint: str, stream_handle: str, num_tokens: int,
                       target_replica: str = "") -> bool:
        return await self._worker.prefetch(endpoint, stream_handle, num_tokens)

    async def cancel_prefetch(self, stream_handle: str, target_replica: str = "") -> None:
        await self._worker.cancel_prefetch(stream_handle)

    async def status(self) -> ReplicaStatus:
        kv = await self._worker.kv_stats() if self._has_connector else WorkerStats(0, 0, 0, 0,
                                                                                  0, 0)
        return ReplicaStatus("decode", self._worker.worker_id, self._probe.latest, kv)

    async def check_health(self) -> None:
        await self._worker.engine.check_health()

    def __del__(self) -> None:
        if "_worker" in self.__dict__:
            self._worker.shutdown()


class RemotePrefill:
    """PrefillClient over a Serve handle; `target` pins the replica (PinnedReplicaRouter),
    otherwise Serve picks one."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def prefill(self, request: GenerateRequest, target: str = "",
                      stream_handle: str = "") -> PrefillResult:
        result: PrefillResult = await self._handle.prefill.remote(
            request, target_replica=target, stream_handle=stream_handle)
        return result

    async def kv_endpoint(self, target: str = "") -> str:
        endpoint: str = await self._handle.kv_endpoint.remote(target_replica=target)
        return endpoint

    async def release(self, transfer: TransferParams) -> None:
        await self._handle.release.remote(transfer)


class RemoteDecode:
    """DecodeClient over a Serve handle; closing the stream cancels it on the replica. With a
    TokenSink, the replica sends the tokens over the token stream (runtime/token_stream.py)."""

    def __init__(self, handle: Any, sink: TokenSink | None = None) -> None:
        self._unary = handle
        self._handle = handle.options(stream=True)
        self._sink = sink

    async def prefetch(self, endpoint: str, stream_handle: str, num_tokens: int,
                       target: str = "") -> bool:
        started: bool = await self._unary.prefetch.remote(endpoint, stream_handle, num_tokens,
                                                          target_replica=target)
        return started

    async def cancel_prefetch(self, stream_handle: str, target: str = "") -> None:
        await self._unary.cancel_prefetch.remote(stream_handle, target_replica=target)

    async def decode(
        self, request: GenerateRequest, first_token_id: int | None,
        transfer: TransferParams | None, target: str = "",
    ) -> AsyncIterator[DecodeChunk]:
        sink = self._sink
        inbox = sink.open(request.request_id) if sink is not None else TokenInbox()
        stream = self._handle.decode.remote(request, first_token_id, transfer,
                                            target_replica=target,
                                            sink=sink.address if sink is not None else "")
        try:
            async for tokens, final in merged(inbox, stream):
                if final is None:
                    yield DecodeChunk(tokens)
                else:
                    yield DecodeChunk(tokens, final.finish_reason, final.timings)
        finally:
            if sink is not None:
                sink.close(request.request_id)
            stream.cancel()
