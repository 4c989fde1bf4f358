"""Ray Serve deployments of the two worker pools, and clients that call them by handle.

The classes are thin: the engine wrappers (prefill_workers/, decode_workers/) hold the logic
and run without Ray. Each replica owns one vLLM engine; its replica id names it in timings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from decode_workers.worker import DecodeChunk, DecodeWorker
from kv_transfer.connector_worker import WorkerStats
from kv_transfer.params import TransferParams
from prefill_workers.worker import PrefillResult, PrefillWorker
from runtime.app_config import AppConfig
from runtime.engine_stats import EngineLoad, LoadProbe
from runtime.engines import build_engine
from runtime.requests import GenerateRequest


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


@serve.deployment
class PrefillServer:
    def __init__(self, config: AppConfig) -> None:
        self._probe = LoadProbe()
        engine = build_engine(config.prefill_engine, "prefill", config.transfer,
                              probe=self._probe)
        self._worker = PrefillWorker(engine, config.transfer.auth_token.get_secret_value(),
                                     worker_id=_replica_id())

    async def prefill(self, request: GenerateRequest) -> PrefillResult:
        return await self._worker.prefill(request)

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
    def __init__(self, config: AppConfig) -> None:
        self._probe = LoadProbe()
        engine = build_engine(config.decode_engine, "decode", config.transfer, probe=self._probe)
        self._worker = DecodeWorker(engine, config.decode_engine.block_size,
                                    config.transfer.on_transfer_failure,
                                    worker_id=_replica_id())

    async def decode(
        self, request: GenerateRequest, first_token_id: int | None,
        transfer: TransferParams | None,
    ) -> AsyncIterator[DecodeChunk]:
        # A caller that stops reading cancels this generator; vLLM then aborts the request.
        async for chunk in self._worker.decode(request, first_token_id, transfer):
            yield chunk

    async def status(self) -> ReplicaStatus:
        return ReplicaStatus("decode", self._worker.worker_id, self._probe.latest,
                             await self._worker.kv_stats())

    async def check_health(self) -> None:
        await self._worker.engine.check_health()

    def __del__(self) -> None:
        if "_worker" in self.__dict__:
            self._worker.shutdown()


class RemotePrefill:
    """PrefillClient over a Serve handle (Serve's router picks the least-loaded replica)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def prefill(self, request: GenerateRequest) -> PrefillResult:
        result: PrefillResult = await self._handle.prefill.remote(request)
        return result

    async def release(self, transfer: TransferParams) -> None:
        await self._handle.release.remote(transfer)


class RemoteDecode:
    """DecodeClient over a Serve handle; closing the stream cancels it on the replica."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle.options(stream=True)

    async def decode(
        self, request: GenerateRequest, first_token_id: int | None,
        transfer: TransferParams | None,
    ) -> AsyncIterator[DecodeChunk]:
        stream = self._handle.decode.remote(request, first_token_id, transfer)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            stream.cancel()
