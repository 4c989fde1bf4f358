"""What both pools' replicas share: their id and cores, the engine's calibration, the load
report loop, and streaming a generation's tokens to the ingress.

A prefill replica decodes too when the decode pool is down (degraded mode, `prefill_local`),
through the same `StreamedGeneration` the decode replicas use.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import psutil
from ray import serve

from decode_workers.worker import DecodeWorker
from kv_transfer.params import TransferParams
from runtime.app_config import AppConfig, PoolConfig
from runtime.autoscaling import DEMAND_METRIC
from runtime.calibration import calibrate, calibrate_decode
from runtime.direct_calls import CallServer
from runtime.engine_config import EngineConfig
from runtime.engine_stats import LoadProbe
from runtime.engines import stream_hosts
from runtime.logprobs import TokenLogprobs
from runtime.messages import REPORT_PERIOD_S, USAGE_EVERY, DecodeChunk, UsageReport
from runtime.requests import GenerateRequest
from runtime.scheduler.types import ReplicaReport
from runtime.streaming import coalesce
from runtime.token_stream import TokenBatch, TokenPublisher


def replica_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - outside a replica (tests)
        return "local"


def pinned(engine: EngineConfig, pool: PoolConfig) -> EngineConfig:
    """The engine config with this replica's cores, when the pool pins replicas to cores."""
    try:
        local_rank = serve.get_replica_context().rank.local_rank
    except Exception:  # noqa: BLE001 - outside a replica, or no rank: the first entry
        local_rank = 0
    cores = pool.cores_for(local_rank)
    return engine.model_copy(update={"cpu_threads_bind": cores}) if cores else engine


async def calibration(engine: Any, config: AppConfig) -> tuple[tuple[int, float], ...]:
    """The engine's prefill times at a few lengths, for the scheduler's model, and decode steps
    at a few batch sizes for the replica's step model (see runtime/calibration.py); nothing
    when scheduler.calibrate is off."""
    if not config.scheduler.calibrate:
        return ()
    model_config = engine.vllm_config.model_config
    samples = await calibrate(engine, model_config.max_model_len, model_config.get_vocab_size())
    await calibrate_decode(engine, model_config.get_vocab_size())
    return samples


# a replica whose load the ingress has not read for this many periods reports it over Serve:
# reads come every period, so a late one does not bring the Serve calls back; a replica whose
# reads stopped can look stale for up to 0.2 s (past the scheduler's 1 s) before its own
# report arrives
PULL_GRACE_PERIODS = 2.0

# what the ingress may call over a replica's direct connection (runtime/direct_calls.py)
DIRECT_METHODS = frozenset({"prefill", "decode", "prefetch", "cancel_prefetch", "release",
                            "kv_endpoint", "load_report"})


async def start_call_server(replica: object, config: AppConfig) -> CallServer | None:
    """The replica's direct-call server, when server.direct_calls is on."""
    if not config.server.direct_calls:
        return None
    server = CallServer(replica, DIRECT_METHODS, config.transfer.auth_token.get_secret_value())
    await server.start(*stream_hosts(config.transfer.bind_host, config.transfer.advertise_host))
    return server


async def shut_down(calls: CallServer | None, worker: Any, grace_s: float,
                    watch: EngineWatch | None = None) -> None:
    """Graceful replica shutdown: the direct calls in flight finish (Serve waits only for
    its own), then the engine's processes stop."""
    if calls is not None:
        await calls.close(grace_s)
    if watch is not None:
        watch.stop()  # the engine stops now on purpose
    if worker is not None:
        worker.shutdown()


STALL_AFTER_S = 60.0  # an engine with work that has not finished a step in this long is stuck
WATCH_PERIOD_S = 0.1


class EngineWatch:
    """Watches this replica's engine processes (vLLM's EngineCore and its workers, children
    of this process): when one is gone, `on_death(reason)` is called at once. vLLM notices
    too, but only reports its engine dead after shutting down the rest (seen: 3.8 s after a
    SIGKILL of the engine core), and the streams on it wait that long.

    Each process is watched through a pidfd on the event loop (readable once the process
    has exited, zombie or reaped): nothing runs until one dies. Without pidfds (Linux before
    5.3) they are polled every period_s."""

    def __init__(self, on_death: Callable[[str], None], period_s: float = WATCH_PERIOD_S,
                 name_prefix: str = "VLLM::") -> None:
        self.dead_reason = ""
        self._on_death = on_death
        self._period_s = period_s
        self._procs = [p for p in psutil.Process().children(recursive=True)
                       if _name(p).startswith(name_prefix)]
        self._loop = asyncio.get_running_loop()
        self._fds: list[int] = []
        self._task: asyncio.Task[None] | None = None
        try:
            for proc in self._procs:
                fd = os.pidfd_open(proc.pid)
                self._fds.append(fd)
                self._loop.add_reader(fd, self._exited, proc.pid)
        except (AttributeError, OSError):  # no pidfd here, or one exited already: poll
            self._close_fds()
            self._task = self._loop.create_task(self._watch())

    def _exited(self, pid: int) -> None:
        self._close_fds()
        if not self.dead_reason:
            self.dead_reason = f"the engine process {pid} exited"
            self._on_death(self.dead_reason)

    async def _watch(self) -> None:
        while self._procs:
            await asyncio.sleep(self._period_s)
            for proc in self._procs:
                if not _alive(proc):
                    self.dead_reason = f"the engine process {proc.pid} exited"
                    self._on_death(self.dead_reason)
                    return

    def _close_fds(self) -> None:
        for fd in self._fds:
            self._loop.remove_reader(fd)
            os.close(fd)
        self._fds.clear()

    def stop(self) -> None:
        self._close_fds()
        if self._task is not None:
            self._task.cancel()


def _name(proc: psutil.Process) -> str:
    try:
        return str(proc.name())
    except psutil.Error:
        return ""


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def engine_healthy(engine: Any, probe: LoadProbe, stall_after_s: float = STALL_AFTER_S) -> bool:
    """False once the engine died (vLLM's AsyncLLM.errored), or stopped making progress: it
    has requests but finished no step for stall_after_s (its probe hears of every step)."""
    if getattr(engine, "errored", False):
        return False
    load = probe.latest
    if load is None or load.num_running + load.num_waiting == 0:
        return True
    return time.monotonic() - load.measured_at_s <= stall_after_s


async def check_health(engine: Any, probe: LoadProbe) -> None:
    """Serve's health check: raises when the engine is dead or stuck (Serve replaces it)."""
    await engine.check_health()
    if not engine_healthy(engine, probe):
        raise RuntimeError(f"the engine finished no step in {STALL_AFTER_S:.0f} s while it "
                           "had requests")


class Reporter:
    """Tells the ingress this replica's load every REPORT_PERIOD_S (it may not exist yet);
    the ingress answers with the pool's demand in replicas, which this replica passes on to
    Serve's autoscaler (runtime/autoscaling.py). Every USAGE_EVERY reports it also sends the
    engine's busy and wall time, if make_usage is given.

    Once the ingress has a direct connection to this replica it reads the load over it
    instead (`pulled`: one frame each way, where a Serve call costs both processes a Ray
    call), and this replica's Serve calls pause while those reads keep coming."""

    def __init__(self, app_name: str, make_report: Callable[[], ReplicaReport],
                 make_usage: Callable[[], UsageReport] | None = None,
                 start: bool = True) -> None:
        self.demand: float | None = None
        self._make_report = make_report
        self._make_usage = make_usage
        self._pulled_at = float("-inf")
        self._num_pulls = 0
        self._task = asyncio.get_running_loop().create_task(
            report_loop(app_name, make_report, self, make_usage)) if start else None

    def autoscaling_stats(self) -> dict[str, float]:
        return {} if self.demand is None else {DEMAND_METRIC: self.demand}

    def pulled(self, demand: float | None) -> tuple[ReplicaReport, UsageReport | None]:
        """The ingress reads the load (and, every USAGE_EVERY reads, the engine's time),
        handing over its pool's demand."""
        if demand is not None:
            self.demand = float(demand)
        self._pulled_at = time.monotonic()
        self._num_pulls += 1
        usage = self._make_usage() if self._make_usage is not None \
            and self._num_pulls % USAGE_EVERY == 0 else None
        return self._make_report(), usage

    @property
    def pulled_recently(self) -> bool:
        """The ingress read the load within the last few periods: no Serve call needed."""
        return time.monotonic() - self._pulled_at < PULL_GRACE_PERIODS * REPORT_PERIOD_S


async def report_loop(app_name: str, make_report: Callable[[], ReplicaReport],
                      reporter: Reporter | None = None,
                      make_usage: Callable[[], UsageReport] | None = None) -> None:
    """Tell the ingress this replica's load every REPORT_PERIOD_S (it may not exist yet)."""
    handle = None
    num_reports = 0
    while True:
        await asyncio.sleep(REPORT_PERIOD_S)
        if reporter is not None and reporter.pulled_recently:
            continue  # the ingress reads it over the direct connection
        num_reports += 1
        try:
            if handle is None:
                # a blocking call (it waits for the controller): keep it off the replica's
                # event loop, which serves requests meanwhile
                handle = await asyncio.to_thread(serve.get_deployment_handle, "Ingress",
                                                 app_name)
            demand = await handle.report_load.remote(make_report())
            if reporter is not None and demand is not None:
                reporter.demand = float(demand)
            if make_usage is not None and num_reports % USAGE_EVERY == 0:
                await handle.report_usage.remote(make_usage())
        except Exception:  # noqa: BLE001 - the ingress is starting or restarting; retry
            handle = None
            await asyncio.sleep(1.0)


class StreamedGeneration:
    """Runs generations on a replica's engine (DecodeWorker) and sends their tokens to the
    ingress's token stream (runtime/token_stream.py), one publisher per ingress address."""

    def __init__(self, worker: DecodeWorker, config: AppConfig) -> None:
        self.worker = worker
        self._interval_s = config.server.stream_interval_ms / 1e3
        self._auth_token = config.transfer.auth_token.get_secret_value()
        self._publishers: dict[str, TokenPublisher] = {}

    async def run(self, request: GenerateRequest, first_token_id: int | None,
                  transfer: TransferParams | None,
                  sink: str) -> AsyncIterator[TokenBatch | DecodeChunk]:
        """Yields only what the token stream at `sink` could not take, as TokenBatches
        (batched every stream_interval_ms when there is no sink), then the final chunk with
        every token. Closing it aborts the request in the engine."""
        # the token stream carries token ids only: a request's logprobs go over the call
        with_logprobs = request.sampling.logprobs is not None \
            or request.sampling.prompt_logprobs is not None
        publisher = self._publisher(sink) if sink and not with_logprobs else None
        chunks = self.worker.decode(request, first_token_id, transfer)
        if publisher is None:
            chunks = coalesce(chunks, self._interval_s, DecodeChunk.merged,
                              lambda chunk: chunk.is_final)
        tokens: list[int] = []
        logprobs: list[TokenLogprobs] = []
        async for chunk in chunks:
            start = len(tokens)
            tokens.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs)
            if chunk.is_final:
                yield replace(chunk, token_ids=tuple(tokens), logprobs=tuple(logprobs))
                return
            if publisher is None or not publisher.publish(request.request_id, start,
                                                          chunk.token_ids):
                yield TokenBatch(start, chunk.token_ids, chunk.logprobs, chunk.prompt_logprobs)

    def _publisher(self, address: str) -> TokenPublisher:
        publisher = self._publishers.get(address)
        if publisher is None:
            publisher = self._publishers[address] = TokenPublisher(address, self._auth_token)
        return publisher
