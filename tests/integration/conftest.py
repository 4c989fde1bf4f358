"""Shared real vLLM CPU engines for the integration tests (started once per test session).

Five engines on the generated tiny model: a prefill engine (KV producer, serving both
transports), three decode engines (KV consumers: "tcp" pulls over the bulk TCP data channel, the
default; "grpc" over gRPC streams, two per pull; "nccl" over the nccl transport in gloo test
mode) and a plain colocated engine that serves as the correctness oracle.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from decode_workers.worker import DecodeWorker
from prefill_workers.worker import PrefillWorker
from runtime.engine_config import EngineConfig, TransferConfig
from runtime.engine_stats import LoadProbe
from runtime.engines import build_engine
from runtime.pipeline import DisaggPipeline
from runtime.tiny_model import make_tiny_model
from tests.integration.helpers import greedy
from tests.integration.serve_app import serve_app  # noqa: F401  (a session fixture)

T = TypeVar("T")
_flush_ids = itertools.count()
BLOCK_SIZE = 128
LEASE_S = 6.0
CHANNELS = ("tcp", "grpc", "nccl")  # decode engines by payload path
SEED_OFFSETS = {"tcp": 0, "grpc": 100, "nccl": 500}  # distinct prompts per decode engine


class EventLoopThread:
    """One asyncio loop for the whole session: AsyncLLM engines are bound to the loop that
    first used them, and pytest's per-test loops would break that."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@dataclass
class Cluster:
    runner: EventLoopThread
    transfer: TransferConfig
    prefill: PrefillWorker
    decoders: dict[str, DecodeWorker]  # by payload path (CHANNELS)
    oracle: Any  # AsyncLLM, colocated
    probes: dict[str, LoadProbe]  # "prefill" and CHANNELS: each engine's live load

    def pipeline(self, channel: str = "tcp", overlap: bool = False) -> DisaggPipeline:
        return DisaggPipeline(self.prefill, self.decoders[channel], overlap=overlap)

    @property
    def decode(self) -> DecodeWorker:
        return self.decoders["tcp"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def cluster(tiny_model: Path):
    runner = EventLoopThread()
    engine_config = EngineConfig(model=str(tiny_model), block_size=BLOCK_SIZE,
                                 kv_cache_bytes=256 << 20, max_num_seqs=16)
    # overlap (off by default) lets the engines stream and prefetch; each pipeline still
    # chooses per request whether to use it (cluster.pipeline(..., overlap=True))
    transfer = TransferConfig(lease_s=LEASE_S, pull_timeout_s=10.0, overlap=True)
    grpc_transfer = transfer.model_copy(
        update={"data_channel": "grpc", "num_streams": 2, "max_chunk_bytes": 256 << 10}
    )
    nccl_transfer = TransferConfig.model_validate(
        {**transfer.model_dump(), "auth_token": transfer.auth_token, "transport": "nccl",
         "gloo_test_mode": True}
    )

    probes = {name: LoadProbe() for name in ("prefill", *CHANNELS)}

    async def start() -> Cluster:
        prefill = PrefillWorker(
            build_engine(engine_config, "prefill", nccl_transfer, probe=probes["prefill"]),
            transfer.auth_token.get_secret_value(),
        )
        decoders = {
            channel: DecodeWorker(
                build_engine(engine_config, "decode", config, probe=probes[channel]), BLOCK_SIZE
            )
            for channel, config in (("tcp", transfer), ("grpc", grpc_transfer),
                                    ("nccl", nccl_transfer))
        }
        oracle = build_engine(engine_config, "colocated")
        return Cluster(runner, transfer, prefill, decoders, oracle, probes)

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    cluster = runner.run(start())
    yield cluster
    engines = [cluster.prefill.engine, cluster.oracle]
    engines += [decoder.engine for decoder in cluster.decoders.values()]
    for engine in engines:
        engine.shutdown()
    runner.stop()


@pytest.fixture(params=CHANNELS)
def channel(request: pytest.FixtureRequest) -> str:
    """The payload path of the decode engine a test runs against."""
    return str(request.param)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest):
    """Every integration test ends with nothing held: no leased blocks on the producer, no
    pending loads on the consumer."""
    yield
    if "cluster" not in request.fixturenames:
        return
    cluster: Cluster = request.getfixturevalue("cluster")

    async def settled() -> tuple[Any, list[Any]]:
        for _ in range(100):
            produced = await cluster.prefill.kv_stats()
            consumed = [await d.kv_stats() for d in cluster.decoders.values()]
            if (produced.num_leases == 0
                    and not any(c.num_loads_in_flight or c.num_prefetches or c.prefetch_bytes
                                for c in consumed)):
                break
            await asyncio.sleep(0.1)
        return produced, consumed

    produced, consumed = cluster.runner.run(settled())
    assert produced.num_leases == 0 and produced.num_leased_blocks == 0, produced
    assert not any(c.num_loads_in_flight for c in consumed), consumed
    assert not any(c.num_prefetches or c.prefetch_bytes for c in consumed), consumed

    # vLLM's own block accounting: one step on each engine (a one-token request) lets it take
    # back what the connector released; then no engine holds a single KV block.
    async def step_every_engine() -> None:
        engines = {"prefill": cluster.prefill.engine}
        engines.update((name, d.engine) for name, d in cluster.decoders.items())
        for name, engine in engines.items():
            async for _ in engine.generate({"prompt_token_ids": [7]}, greedy(1).to_vllm(),
                                           request_id=f"flush-{name}-{next(_flush_ids)}"):
                pass

    cluster.runner.run(step_every_engine())
    # a handed-off prompt's stream goes with its lease, at the producer's next step
    produced = cluster.runner.run(cluster.prefill.kv_stats())
    assert produced.num_streams == 0, produced
    for name, probe in cluster.probes.items():
        load = probe.latest
        assert load is not None, f"{name} engine reported no load"
        assert load.kv_cache_usage == 0.0, f"{name} engine still holds KV blocks: {load}"
        assert load.num_running == load.num_waiting == 0, f"{name}: {load}"
