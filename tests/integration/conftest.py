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
import re
import threading
import warnings
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from decode_workers.worker import DecodeWorker
from prefill_workers.worker import PrefillWorker
from runtime.engine_config import EngineConfig, TransferConfig
from runtime.engine_stats import LoadProbe
from runtime.engines import build_engine, token_prompt
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


def _root_cause(pytestconfig: pytest.Config) -> str:
    """The exception lines the engine processes printed (captured by pytest): vLLM's own
    error only says "see root cause above", which a CI log's tail can cut off."""
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    if capman is None:
        return "(output not captured)"
    out, err = capman.read_global_capture()
    lines = [line.strip() for line in (out + err).splitlines()
             if re.search(r"\w(Error|Exception)\b.*:", line)
             and "Engine core initialization failed" not in line]
    cause = " | ".join(lines[-4:]) or "(no exception line printed)"
    reporter = pytestconfig.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:  # on the terminal too: a summary line can be cut to its width
        with capman.global_and_fixture_disabled():
            reporter.write_line(f"\nengine start failed: {cause}")
    return cause


def _build_with_cause(pytestconfig: pytest.Config, runner: EventLoopThread,
                      build: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Start engines once more if the first start fails (a failed start is reported as a
    warning with its cause); a second failure is raised with the cause in its message."""
    try:
        return runner.run(build())
    except Exception as err:  # noqa: BLE001 - retried once, then raised with its cause
        cause = _root_cause(pytestconfig)
        warnings.warn(f"engine start failed once ({err}); cause: {cause}", stacklevel=1)
    try:
        return runner.run(build())
    except Exception as err:
        raise RuntimeError(f"engines failed to start twice: {err}; cause: "
                           f"{_root_cause(pytestconfig)}") from err


@pytest.fixture(scope="session")
def cluster(tiny_model: Path, pytestconfig: pytest.Config):
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

    started: list[Any] = []  # engines, shut down if a later one fails to start

    def engine(*args: Any, **kwargs: Any) -> Any:
        started.append(build_engine(engine_config, *args, **kwargs))
        return started[-1]

    async def start() -> Cluster:
        try:
            prefill = PrefillWorker(engine("prefill", nccl_transfer, probe=probes["prefill"]),
                                    transfer.auth_token.get_secret_value())
            decoders = {
                channel: DecodeWorker(engine("decode", config, probe=probes[channel]),
                                      BLOCK_SIZE)
                for channel, config in (("tcp", transfer), ("grpc", grpc_transfer),
                                        ("nccl", nccl_transfer))
            }
            oracle = engine("colocated")
        except BaseException:
            for built in started:
                built.shutdown()
            started.clear()
            raise
        return Cluster(runner, transfer, prefill, decoders, oracle, probes)

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    cluster = _build_with_cause(pytestconfig, runner, start)
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
            async for _ in engine.generate(token_prompt([7]), greedy(1).to_vllm(),
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


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    """The tiny model's tokenizer (Hugging Face's, as the ingress loads it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)
