"""Build vLLM engines (AsyncLLM) for the prefill, decode and colocated roles."""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Literal

import psutil

from kv_transfer.config import ConnectorConfig, TransferSettings
from runtime.engine_config import (
    BIND_WORDS,
    EngineConfig,
    EngineRole,
    TransferConfig,
    core_set,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vllm.inputs.engine import TokensInput
    from vllm.v1.engine.async_llm import AsyncLLM

    from runtime.cost_tracker import CostTracker
    from runtime.engine_stats import LoadProbe

CONNECTOR_NAME = "DisaggConnector"
CONNECTOR_MODULE = "kv_transfer.connector"
WORKER_EXTENSION = "kv_transfer.worker_extension.DisaggWorkerExtension"
_KV_ROLES: dict[str, Literal["kv_producer", "kv_consumer"]] = {
    "prefill": "kv_producer",
    "decode": "kv_consumer",
}


def token_prompt(token_ids: Sequence[int]) -> TokensInput:
    """A prompt of token ids as the engine takes it rendered (vLLM's `tokens_input`, what its
    own server passes). AsyncLLM renders a raw {"prompt_token_ids": ...} dict in a worker
    thread first: a thread hop on every request."""
    from vllm.inputs.engine import tokens_input

    return tokens_input(list(token_ids))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on host."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def node_ip() -> str:
    """This node's address as other nodes of the Ray cluster see it."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())


def stream_hosts(bind_host: str, advertise_host: str) -> tuple[str, str]:
    """(host to bind, host peers dial): a wildcard bind is no address to dial."""
    if advertise_host:
        return bind_host, advertise_host
    return bind_host, node_ip() if bind_host in _WILDCARD_HOSTS else bind_host


def connector_config(transfer: TransferConfig, role: EngineRole,
                     port: int | None = None) -> ConnectorConfig:
    """The connector settings of one engine: every TransferSettings field as configured, with
    the advertised host, the producer's port (given, else transfer.port, else a free one) and
    the collective backend resolved."""
    _, advertise = stream_hosts(transfer.bind_host, transfer.advertise_host)
    if role != "prefill":
        port = 0  # only producers serve blocks
    elif port is None:
        port = transfer.port or free_port(transfer.bind_host)
    shared = {name: getattr(transfer, name) for name in TransferSettings.model_fields}
    return ConnectorConfig.model_validate({
        **shared,
        "advertise_host": advertise,
        "port": port,
        "auth_token": transfer.auth_token,
        "collective_backend": transfer.collective_backend,
    })


def build_engine(
    config: EngineConfig,
    role: EngineRole,
    transfer: TransferConfig | None = None,
    kv_port: int | None = None,
    probe: LoadProbe | None = None,
    costs: CostTracker | None = None,
) -> AsyncLLM:
    """Start one engine (30-60 s on a 2-core CPU). Call from code under `__main__`: vLLM
    spawns its engine processes. `probe`, if given, receives the engine's load every step;
    `costs` each step's duration and batch (vLLM then measures every step)."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerFactory

    from runtime.engine_stats import CostProbe, DropIterationLines

    kv_transfer_config = None
    if role != "colocated":
        transfer = transfer or TransferConfig()
        kv_transfer_config = KVTransferConfig(
            kv_connector=CONNECTOR_NAME,
            kv_connector_module_path=CONNECTOR_MODULE,
            kv_role=_KV_ROLES[role],
            # The DecodeWorker applies on_transfer_failure itself (per request); the engine
            # only has to fail the request cleanly.
            kv_load_failure_policy="fail",
            kv_connector_extra_config=connector_config(transfer, role, kv_port).to_extra_config(),
        )
    if (niceness := os.nice(0)) > 0:  # the engine's processes inherit it
        log.warning("this engine runs at niceness %d (a Ray worker's default is 15): every "
                    "process at niceness 0 on its cores takes them first. Start Ray with "
                    "RAY_worker_niceness=0 (`disagg serve` and scripts/local-cluster.sh do).",
                    niceness)
    cores = None
    if config.cpu_threads_bind is not None:
        # vLLM's CPU workers read their core binding from the environment at start.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_threads_bind
        cores = None if config.cpu_threads_bind in BIND_WORDS else \
            core_set(config.cpu_threads_bind)
    if config.executor == "uni":
        # vLLM's CPU platform turns a one-worker engine's "uni" executor into "mp" unless
        # this is 0. AsyncLLM runs its engine core in a process of its own either way.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if (threads := omp_threads(config, cores)) is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    log.info("engine (%s) computes on %s threads (OMP_NUM_THREADS)", role,
             os.environ.get("OMP_NUM_THREADS", "the default number of"))
    args = AsyncEngineArgs(
        model=config.model,
        dtype=config.dtype,
        block_size=config.block_size,
        max_model_len=config.max_model_len,
        kv_cache_memory_bytes=config.kv_cache_bytes,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        enable_prefix_caching=config.enable_prefix_caching,
        scheduling_policy=config.scheduling_policy,
        long_prefill_token_threshold=config.long_prefill_chunk_tokens,
        enforce_eager=config.enforce_eager,
        distributed_executor_backend=config.executor,
        disable_log_stats=False,
        enable_logging_iteration_details=costs is not None,
        kv_transfer_config=kv_transfer_config,
        worker_extension_cls=WORKER_EXTENSION if kv_transfer_config else "",
    )
    stat_loggers: list[StatLoggerFactory] = [probe.factory] if probe else []
    if costs is not None:
        DropIterationLines.install()
        stat_loggers.append(CostProbe(costs).factory)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine = AsyncLLM.from_engine_args(args, stat_loggers=stat_loggers or None)
    if config.executor == "uni" and cores is not None:
        _pin_new_engine_cores(before, cores)
    return engine


def omp_threads(config: EngineConfig, cores: set[int] | None) -> int | None:
    """The engine's OpenMP threads: engine.cpu_threads, else one per bound core for the "uni"
    executor (vLLM binds an "mp" worker's threads itself), else None (the process's own
    OMP_NUM_THREADS, which Ray sets in a replica to its num_cpus, at least 1)."""
    if config.cpu_threads is not None:
        return config.cpu_threads
    if cores is not None and config.executor == "uni":
        return len(cores)  # one OpenMP thread per core, as vLLM gives its workers
    return None


def _pin_new_engine_cores(before: set[int], cores: set[int]) -> None:
    """Pin every thread of the engine core processes started since `before` to cores. vLLM
    binds a CPU engine's threads only when it starts a worker process (by OpenMP's
    environment); with the model in the engine core ("uni") nothing binds them. Threads
    started later inherit their creator's cores."""
    for proc in psutil.Process().children(recursive=True):
        if proc.pid in before:
            continue
        try:
            if not proc.name().startswith("VLLM::EngineCore"):
                continue
            for thread in proc.threads():
                os.sched_setaffinity(thread.id, cores)
        except (psutil.Error, ProcessLookupError):
            continue
