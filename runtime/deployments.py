"""Ray Serve deployments of the two worker pools.

The classes are thin: the engine wrappers (prefill_workers/, decode_workers/) hold the logic
and run without Ray; runtime/replica_common.py what both pools share. Each replica owns one
vLLM engine; its replica id names it in timings. Clients that call them by handle are in
runtime/clients.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from ray import serve

from decode_workers.worker import DecodeWorker
from kv_transfer.connector_worker import WorkerStats
from kv_transfer.params import TransferParams
from prefill_workers.worker import PrefillWorker
from runtime.app_config import AppConfig
from runtime.cost import EngineUsage
from runtime.cost_tracker import CostTracker
from runtime.engine_config import EngineRole
from runtime.engine_stats import EngineLoad, LoadProbe
from runtime.engines import build_engine
from runtime.loop_watch import LoopWatch
from runtime.messages import DecodeChunk, PrefillResult, UsageReport
from runtime.replica_common import (
    EngineWatch,
    Reporter,
    StreamedGeneration,
    calibration,
    check_health,
    engine_healthy,
    pinned,
    replica_id,
    shut_down,
    start_call_server,
)
from runtime.requests import GenerateRequest
from runtime.scheduler.types import ReplicaReport
from runtime.token_stream import TokenBatch


@dataclass(frozen=True)
class ReplicaStatus:
    role: str
    replica_id: str
    load: EngineLoad | None
    kv: WorkerStats
    usage: EngineUsage  # the engine's busy time against its wall time (idle capacity)
    num_loop_stalls: int  # times its event loop stood still for LoopWatch's stall_s or more


def _kv_room(probe: LoadProbe, num_blocks: int) -> tuple[int, int]:
    """(free KV blocks, sequences running or waiting) of an engine, from its last step."""
    load = probe.latest
    if load is None:
        return num_blocks, 0
    return int((1.0 - load.kv_cache_usage) * num_blocks), load.num_running + load.num_waiting


def _decode_step(costs: CostTracker) -> tuple[float, ...]:
    model = costs.decode_steps.model
    return () if model is None else (model.s0_ms, model.s1_ms)


@serve.deployment
class PrefillServer:
    async def __init__(self, config: AppConfig) -> None:  # type: ignore[misc]
        self._probe = LoadProbe()
        self._costs = CostTracker(
            config.prefill_engine.block_size, config.prefill.cost_per_replica_hour,
            by_priority=config.prefill_engine.scheduling_policy == "priority")
        engine = build_engine(pinned(config.prefill_engine, config.prefill), "prefill",
                              config.transfer, probe=self._probe, costs=self._costs)
        self._worker = PrefillWorker(engine, config.transfer.auth_token.get_secret_value(),
                                     worker_id=replica_id(), costs=self._costs)
        # degraded mode (no live decode replica): this replica serves whole requests
        self._generation = StreamedGeneration(
            DecodeWorker(engine, config.prefill_engine.block_size, worker_id=replica_id(),
                         costs=self._costs),
            config)
        self._pending_tokens = 0
        self._num_blocks = int(engine.vllm_config.cache_config.num_gpu_blocks or 0)
        self._max_num_seqs = config.prefill_engine.max_num_seqs
        self._block_size = config.prefill_engine.block_size
        self._calibration = await calibration(engine, config)
        # its engine's processes gone: the prefills and whole requests on it end at once
        self._watch = EngineWatch(self._engine_died)
        self._drain_s = config.server.request_timeout_s
        self._loop_watch = LoopWatch(f"prefill replica {replica_id()}")
        self._loop_watch.start()
        self._calls = await start_call_server(self, config)
        self._reporter = Reporter(config.server.app_name, self._report, self._usage)

    def _engine_died(self, reason: str) -> None:
        self._worker.engine_died(reason)
        self._generation.worker.engine_died(reason)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaler reads the pool's demand here (runtime/autoscaling.py)."""
        return self._reporter.autoscaling_stats()

    def _report(self) -> ReplicaReport:
        free, active = _kv_room(self._probe, self._num_blocks)
        return ReplicaReport("prefill", self._worker.worker_id, self._pending_tokens, free,
                             self._num_blocks, self._block_size, active,
                             self._max_num_seqs, time.time(), self._calibration,
                             engine_healthy(self._worker.engine, self._probe)
                             and not self._watch.dead_reason,
                             self._calls.address if self._calls else "",
                             _decode_step(self._costs))

    def _usage(self) -> UsageReport:
        return UsageReport("prefill", self._worker.worker_id, self._costs.usage())

    async def load_report(self, demand: float | None = None
                          ) -> tuple[ReplicaReport, UsageReport | None]:
        """The ingress reads this replica's load over its direct connection."""
        return self._reporter.pulled(demand)

    async def prefill(self, request: GenerateRequest, target_replica: str = "",
                      stream_handle: str = "") -> PrefillResult:
        self._pending_tokens += len(request.prompt_token_ids)
        try:
            return await self._worker.prefill(request, stream_handle=stream_handle)
        finally:
            self._pending_tokens -= len(request.prompt_token_ids)

    async def decode(
        self, request: GenerateRequest, first_token_id: int | None,
        transfer: TransferParams | None, target_replica: str = "", sink: str = "",
    ) -> AsyncIterator[TokenBatch | DecodeChunk]:
        """Degraded mode: the whole request on this replica's engine (see DecodeServer)."""
        async for item in self._generation.run(request, first_token_id, transfer, sink):
            yield item

    async def kv_endpoint(self, target_replica: str = "") -> str:
        return await self._worker.kv_endpoint()

    async def release(self, transfer: TransferParams) -> None:
        await self._worker.release(transfer)

    async def status(self) -> dict[str, Any]:
        """As plain data: the ingress imports no engine module to read it."""
        return asdict(ReplicaStatus("prefill", self._worker.worker_id, self._probe.latest,
                                    await self._worker.kv_stats(), self._costs.usage(),
                                    self._loop_watch.num_stalls))

    async def check_health(self) -> None:
        await check_health(self._worker.engine, self._probe)

    async def __del__(self) -> None:
        # Serve awaits this on graceful replica shutdown: the direct calls in flight finish,
        # then the engine's processes stop.
        await shut_down(self.__dict__.get("_calls"), self.__dict__.get("_worker"),
                        self.__dict__.get("_drain_s", 0.0), self.__dict__.get("_watch"))


@serve.deployment
class DecodeServer:
    async def __init__(self, config: AppConfig) -> None:  # type: ignore[misc]
        self._probe = LoadProbe()
        self._costs = CostTracker(
            config.decode_engine.block_size, config.decode.cost_per_replica_hour,
            by_priority=config.decode_engine.scheduling_policy == "priority")
        role: EngineRole = "decode" if config.serving == "disaggregated" else "colocated"
        engine = build_engine(pinned(config.decode_engine, config.decode), role,
                              config.transfer, probe=self._probe, costs=self._costs)
        self._has_connector = role == "decode"
        self._worker = DecodeWorker(engine, config.decode_engine.block_size,
                                    config.transfer.on_transfer_failure,
                                    worker_id=replica_id(), costs=self._costs)
        self._generation = StreamedGeneration(self._worker, config)
        self._num_blocks = int(engine.vllm_config.cache_config.num_gpu_blocks or 0)
        self._block_size = config.decode_engine.block_size
        self._max_num_seqs = config.decode_engine.max_num_seqs
        self._calibration = await calibration(engine, config)
        self._watch = EngineWatch(self._worker.engine_died)  # its streams end at once
        self._drain_s = config.server.request_timeout_s
        self._loop_watch = LoopWatch(f"{role} replica {replica_id()}")
        self._loop_watch.start()
        self._calls = await start_call_server(self, config)
        self._reporter = Reporter(config.server.app_name, self._report, self._usage)

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self._reporter.autoscaling_stats()

    def _usage(self) -> UsageReport:
        return UsageReport("decode", self._worker.worker_id, self._costs.usage())

    async def load_report(self, demand: float | None = None
                          ) -> tuple[ReplicaReport, UsageReport | None]:
        """The ingress reads this replica's load over its direct connection."""
        return self._reporter.pulled(demand)

    def _report(self) -> ReplicaReport:
        free, active = _kv_room(self._probe, self._num_blocks)
        return ReplicaReport("decode", self._worker.worker_id, 0, free, self._num_blocks,
                             self._block_size, active, self._max_num_seqs, time.time(),
                             self._calibration,
                             engine_healthy(self._worker.engine, self._probe)
                             and not self._watch.dead_reason,
                             self._calls.address if self._calls else "",
                             _decode_step(self._costs))

    async def decode(
        self, request: GenerateRequest, first_token_id: int | None,
        transfer: TransferParams | None, target_replica: str = "", sink: str = "",
    ) -> AsyncIterator[TokenBatch | DecodeChunk]:
        """Tokens go to the ingress's token stream at `sink`; this call yields what the
        stream could not take, then the final chunk with every token. A caller that stops
        reading cancels this generator; vLLM then aborts the request."""
        async for item in self._generation.run(request, first_token_id, transfer, sink):
            yield item

    async def prefetch(self, endpoint: str, stream_handle: str, num_tokens: int,
                       target_replica: str = "") -> bool:
        return await self._worker.prefetch(endpoint, stream_handle, num_tokens)

    async def cancel_prefetch(self, stream_handle: str, target_replica: str = "") -> None:
        await self._worker.cancel_prefetch(stream_handle)

    async def status(self) -> dict[str, Any]:
        kv = await self._worker.kv_stats() if self._has_connector else WorkerStats(0, 0, 0, 0,
                                                                                  0, 0)
        return asdict(ReplicaStatus("decode", self._worker.worker_id, self._probe.latest, kv,
                                    self._costs.usage(), self._loop_watch.num_stalls))

    async def check_health(self) -> None:
        await check_health(self._worker.engine, self._probe)

    async def __del__(self) -> None:
        # Serve awaits this on graceful replica shutdown: the direct calls in flight finish,
        # then the engine's processes stop.
        await shut_down(self.__dict__.get("_calls"), self.__dict__.get("_worker"),
                        self.__dict__.get("_drain_s", 0.0), self.__dict__.get("_watch"))
