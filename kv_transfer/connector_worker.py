"""Worker side of the disagg connector (runs in the vLLM worker process, next to the KV tensors).

Producer: `register_kv_caches` starts the KV block server and a reaper thread that expires
overdue leases on time, busy or idle; each step grants the leases the scheduler published and
reports freed blocks as finished sending.
Consumer: each step starts the loads the scheduler planned on a thread pool; a load pulls the
blocks straight into the paged cache, then releases the producer's lease; completed loads are
reported as finished receiving (failed ones also as failed), with their TransferStats.

Overlap (transfer during the prefill):
  Producer: `begin_step` (before the forward pass) applies the step's StreamSteps/StreamEnds;
  `layer_saved` (the connector's save_kv_layer, after each attention layer) and `step_saved`
  (wait_for_save) mark layers ready, so stream pulls send layer i while layer i+1 computes.
  Blocks whose lease ended are reported freed only once no stream reader reads them.
  Consumer: `prefetch` starts a stream pull into staging (prefetch.py) while the prefill
  runs; the request's load then copies the staged blocks into its paged blocks, or pulls as
  usual if the prefetch failed or was skipped.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
from vllm.logger import init_logger

from kv_transfer.collective_client import CollectiveKVClient
from kv_transfer.collective_sender import CollectiveSender, collective_handlers
from kv_transfer.collective_transport import WorkerIdentity
from kv_transfer.config import ConnectorConfig
from kv_transfer.grpc_client import GrpcKVClient
from kv_transfer.grpc_server import GrpcKVServer
from kv_transfer.layout import KVLayout
from kv_transfer.leases import LeaseTable
from kv_transfer.metadata import DisaggConnectorMetadata, DisaggWorkerMetadata, LoadSpec
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.params import PrefetchSpec, TransferStats
from kv_transfer.prefetch import Prefetch, Prefetcher
from kv_transfer.streams import StreamTable
from kv_transfer.transport import KVBlockClient, PullResult, TransferError

logger = init_logger(__name__)

MAX_REAP_INTERVAL_S = 1.0
RELEASE_TIMEOUT_S = 2.0
NUM_RECENT_ERRORS = 1024


@dataclass
class _Load:
    spec: LoadSpec
    future: Future[PullResult]
    cancelled: threading.Event = field(default_factory=threading.Event)
    started_at: float = field(default_factory=time.perf_counter)  # reached this worker
    done_at: float = 0.0
    overlapped: bool = False  # the blocks came from a prefetch


@dataclass(frozen=True)
class WorkerStats:
    """A snapshot of one worker's transfer state, for tests and operators."""

    num_leases: int
    num_leased_blocks: int
    num_loads_in_flight: int
    num_loads_done: int
    num_loads_failed: int
    loaded_bytes: int
    num_streams: int = 0  # producer: streams of prompts being prefilled or leased
    num_prefetches: int = 0  # consumer: prefetches not claimed yet
    prefetch_bytes: int = 0  # consumer: staging memory held
    num_loads_overlapped: int = 0  # consumer: loads served from a prefetch

    @classmethod
    def from_wire(cls, value: WorkerStats | dict[str, int]) -> WorkerStats:
        """vLLM's RPC may deliver the dataclass as a dict of its fields."""
        if isinstance(value, WorkerStats):
            return value
        return cls(**value)


class ConnectorWorker:
    def __init__(self, config: ConnectorConfig, is_producer: bool, is_consumer: bool,
                 num_blocks: int, tp_size: int = 1, tp_rank: int = 0,
                 block_size: int = 16, num_kv_heads: int = 0, head_dim: int = 0) -> None:
        self._config = config
        self._model_layout = (num_kv_heads, head_dim)
        self._identity = WorkerIdentity(config.collective_backend, tp_size, tp_rank)
        self._is_producer = is_producer
        self._is_consumer = is_consumer
        self._num_blocks = num_blocks
        self._cache: PagedKVCache | None = None
        self._leases = LeaseTable()
        self._server: GrpcKVServer | None = None
        self._sender: CollectiveSender | None = None
        self._client: KVBlockClient | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._loads: dict[str, _Load] = {}
        self._done_stats: dict[str, TransferStats] = {}
        self._recent_errors: OrderedDict[str, str] = OrderedDict()
        self._stopped = threading.Event()
        self._reaper: threading.Thread | None = None
        self._num_loads_done = 0
        self._num_loads_failed = 0
        self._loaded_bytes = 0
        self._num_loads_overlapped = 0
        self._block_size = block_size
        self._streams: StreamTable | None = None
        self._layer_index: dict[str, int] = {}
        self._freeing: set[str] = set()  # leases ended, blocks still read by a stream reader
        self._prefetcher: Prefetcher | None = None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._cache = PagedKVCache(kv_caches, self._num_blocks)
        token = self._config.auth_token.get_secret_value()
        self._layer_index = {name: i for i, name in enumerate(self._cache.layer_names)}
        num_kv_heads, head_dim = self._model_layout
        layout = KVLayout.of_cache(self._cache, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                   block_size=self._block_size)
        if self._is_producer and self._config.overlap:
            self._streams = StreamTable(self._cache.block_bytes_per_layer, self._block_size)
        if self._is_producer:
            self._server = GrpcKVServer(
                self._cache,
                self._leases,
                bind_host=self._config.bind_host,
                port=self._config.port,
                auth_token=token,
                max_chunk_bytes=self._config.max_chunk_bytes,
                handle_wait_s=self._config.handle_wait_s,
                streams=self._streams,
                stream_wait_s=self._config.pull_timeout_s,
                layout=layout,
            )
            if self._config.transport == "nccl":
                self._sender = CollectiveSender(self._cache, self._identity,
                                                self._config.bind_host,
                                                self._config.group_timeout_s)
                self._server.add_handlers(collective_handlers(self._server, self._sender))
            endpoint = self._server.start()
            self._reaper = threading.Thread(target=self._reap_leases, name="kv-lease-reaper",
                                            daemon=True)
            self._reaper.start()
            logger.info("disagg KV server on %s (%d layers, %d B per block)", endpoint,
                        self._cache.num_layers, self._cache.block_bytes)
        if self._is_consumer:
            grpc_client = GrpcKVClient(
                self._cache,
                auth_token=token,
                max_chunk_bytes=self._config.max_chunk_bytes,
                num_streams=self._config.num_streams,
                bulk_tcp=self._config.data_channel == "tcp",
                layout=layout,
            )
            self._client = grpc_client
            if self._config.transport == "nccl":
                self._client = CollectiveKVClient(self._cache, self._identity, grpc_client,
                                                  self._config.max_chunk_bytes)
            self._pool = ThreadPoolExecutor(self._config.num_pull_threads,
                                            thread_name_prefix="kv-pull")
            if self._config.overlap:
                self._prefetcher = Prefetcher(
                    self._cache, self._client, max_bytes=self._config.max_prefetch_bytes,
                    ttl_s=self._config.pull_timeout_s + self._config.lease_s,
                    timeout_s=self._config.pull_timeout_s,
                    num_threads=self._config.num_pull_threads,
                )
            self._reaper = threading.Thread(target=self._reap_prefetches,
                                            name="kv-prefetch-reaper", daemon=True)
            self._reaper.start()

    def begin_step(self, meta: DisaggConnectorMetadata) -> None:
        """Producer, before the step's forward pass: what the step computes of each stream."""
        if self._streams is None:
            for end in meta.stream_ends:
                logger.debug("stream %s ended: %s (overlap off)", end.handle[:6], end.reason)
            return
        for end in meta.stream_ends:
            self._streams.fail(end.handle, end.reason)
        for step in meta.stream_steps:
            self._streams.advance(step.handle, step.request_id, step.num_prompt_tokens,
                                  step.block_ids, step.num_ready_tokens, step.num_target_tokens)

    def layer_saved(self, layer_name: str) -> None:
        """Producer: the step's forward pass has written this layer (save_kv_layer)."""
        if self._streams is not None and (index := self._layer_index.get(layer_name)) is not None:
            self._streams.mark_layer(index)

    def step_saved(self) -> None:
        """Producer: the step's forward pass is over (wait_for_save): every layer is written."""
        if self._streams is not None:
            self._streams.mark_all()

    def prefetch(self, spec: PrefetchSpec) -> bool:
        """Consumer: start pulling a prompt still being prefilled; False if skipped."""
        if self._prefetcher is None:
            # A silent refusal made every overlapped request fall back to a normal pull.
            logger.warning_once("prefetch refused: overlap is off on this decode engine "
                                "(TransferConfig.overlap); the KV is pulled after the prefill")
            return False
        return self._prefetcher.start(spec)

    def cancel_prefetch(self, stream_handle: str) -> None:
        if self._prefetcher is not None:
            self._prefetcher.cancel(stream_handle)

    def start_load_kv(self, meta: DisaggConnectorMetadata) -> None:
        for lease in meta.leases:
            self._leases.grant(lease.handle, lease.request_id, lease.block_ids, lease.lease_s)
        if not (meta.loads or meta.releases):
            return
        assert self._pool is not None and self._client is not None, "loads on a non-consumer"
        for spec in meta.loads:
            load = _Load(spec, Future())
            self._loads[spec.request_id] = load
            self._pool.submit(self._run_load, load)
        for release in meta.releases:
            self._pool.submit(self._client.release, release.endpoint, release.handle,
                              RELEASE_TIMEOUT_S)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        for request_id in finished_req_ids:
            if (load := self._loads.get(request_id)) is not None:
                load.cancelled.set()  # aborted while loading
        freed = self._leases.take_freed() | self._freeing
        if self._streams is not None:
            # never hand blocks back to vLLM while a stream reader may still read them
            self._freeing = self._streams.drop_requests(freed)
            freed -= self._freeing
        results = KVConnectorTransferResults(finished_sending=freed)
        for request_id, load in list(self._loads.items()):
            if not load.future.done():
                continue
            del self._loads[request_id]
            results.finished_recving.add(request_id)
            self._done_stats[request_id] = self._finish_load(load, results)
        return results

    def build_worker_meta(self) -> DisaggWorkerMetadata | None:
        if not self._done_stats:
            return None
        meta, self._done_stats = DisaggWorkerMetadata(self._done_stats), {}
        return meta

    def stats(self) -> WorkerStats:
        return WorkerStats(
            num_leases=self._leases.num_leases,
            num_leased_blocks=self._leases.num_leased_blocks,
            num_loads_in_flight=len(self._loads),
            num_loads_done=self._num_loads_done,
            num_loads_failed=self._num_loads_failed,
            loaded_bytes=self._loaded_bytes,
            num_streams=self._streams.num_streams if self._streams else 0,
            num_prefetches=self._prefetcher.num_prefetches if self._prefetcher else 0,
            prefetch_bytes=self._prefetcher.bytes_in_use if self._prefetcher else 0,
            num_loads_overlapped=self._num_loads_overlapped,
        )

    def load_error(self, request_id: str) -> str:
        """Why the load of a recent request failed ('' if it did not or is forgotten).

        AsyncLLM suffixes the caller's request id with "-<random>" before it reaches the
        engine, so the caller's id matches as a prefix.
        """
        for internal_id in reversed(self._recent_errors):
            if internal_id == request_id or internal_id.startswith(request_id + "-"):
                return self._recent_errors[internal_id]
        return ""

    def shutdown(self) -> None:
        self._stopped.set()
        if self._reaper is not None:
            self._reaper.join(2)
        for load in self._loads.values():
            load.cancelled.set()
        if self._prefetcher is not None:
            self._prefetcher.shutdown()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._client is not None:
            self._client.close()
        self._leases.revoke_all()
        if self._server is not None:
            self._server.stop(grace_s=0.5)
        if self._sender is not None:
            self._sender.stop()

    def _run_load(self, load: _Load) -> None:
        assert self._client is not None
        spec = load.spec
        try:
            result = self._load_prefetched(load)
            if result is None:
                result = self._client.pull(
                    spec.endpoint,
                    spec.handle,
                    list(spec.remote_block_ids),
                    list(spec.local_block_ids),
                    timeout_s=self._config.pull_timeout_s,
                    cancelled=load.cancelled,
                )
            load.done_at = time.perf_counter()
            load.future.set_result(result)
        except BaseException as err:  # noqa: BLE001 - any failure must reach the scheduler
            load.done_at = time.perf_counter()
            load.future.set_exception(err)
        finally:
            self._client.release(spec.endpoint, spec.handle, RELEASE_TIMEOUT_S)

    def _load_prefetched(self, load: _Load) -> PullResult | None:
        """The load served from its prefetch (waiting for the rest of it), or None if there is
        no usable prefetch: then the caller pulls from the lease."""
        spec = load.spec
        if not spec.stream_handle or self._prefetcher is None:
            return None
        prefetch = self._prefetcher.claim(spec.stream_handle)
        if prefetch is None:
            return None
        try:
            return self._copy_staged(load, prefetch)
        except TransferError as err:
            if load.cancelled.is_set():
                raise
            logger.info("request %s: prefetch unusable (%s); pulling after the prefill",
                        spec.request_id, err)
            return None
        finally:
            self._prefetcher.free(prefetch)

    def _copy_staged(self, load: _Load, prefetch: Prefetch) -> PullResult:
        spec = load.spec
        assert self._cache is not None
        deadline = time.monotonic() + self._config.pull_timeout_s
        pulled = prefetch.wait(deadline, load.cancelled)
        staging = prefetch.staging
        last = spec.first_block_index + len(spec.local_block_ids)
        if staging is None or last > staging.num_blocks:
            raise TransferError(f"prefetch holds {prefetch.spec.num_blocks} blocks, "
                                f"the load needs {last}")
        started = time.perf_counter()
        num_bytes = self._cache.copy_blocks_from(
            staging, list(range(spec.first_block_index, last)), list(spec.local_block_ids)
        )
        copy_ms = (time.perf_counter() - started) * 1e3
        load.overlapped = True
        moving_ms = max(0.0, pulled.transfer_ms - pulled.producer_wait_ms)
        return PullResult(len(spec.local_block_ids), num_bytes, moving_ms + copy_ms)

    def _finish_load(self, load: _Load, results: KVConnectorTransferResults) -> TransferStats:
        spec = load.spec
        err = load.future.exception()
        if err is None:
            pulled = load.future.result()
            self._num_loads_done += 1
            self._num_loads_overlapped += load.overlapped
            self._loaded_bytes += pulled.transfer_bytes
            exposed_ms = (load.done_at - load.started_at) * 1e3
            return TransferStats(spec.num_tokens, pulled.num_blocks, pulled.transfer_bytes,
                                 pulled.transfer_ms, exposed_transfer_ms=exposed_ms,
                                 overlapped=load.overlapped)
        self._num_loads_failed += 1
        results.failed_recving.add(spec.request_id)
        reason = str(err) if isinstance(err, TransferError) else f"{type(err).__name__}: {err}"
        logger.warning("KV load for request %s failed: %s", spec.request_id, reason)
        self._recent_errors[spec.request_id] = reason
        if len(self._recent_errors) > NUM_RECENT_ERRORS:
            self._recent_errors.popitem(last=False)
        return TransferStats(0, 0, 0, 0.0, error=reason)

    def _reap_prefetches(self) -> None:
        while not self._stopped.wait(MAX_REAP_INTERVAL_S):
            if self._prefetcher is not None:
                self._prefetcher.expire()

    def _reap_leases(self) -> None:
        while not self._stopped.is_set():
            self._leases.expire()
            next_deadline = self._leases.next_deadline_s
            wait_s = MAX_REAP_INTERVAL_S
            if next_deadline is not None:
                wait_s = min(wait_s, max(0.01, next_deadline - time.monotonic()))
            self._stopped.wait(wait_s)
