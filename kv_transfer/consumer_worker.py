"""Consumer side of the connector's worker (a decode engine's worker process, next to its KV
tensors).

Lifecycle of one load:
  1. `start` (each step) submits the loads the scheduler planned to a thread pool, and the
     releases of handles with nothing to load.
  2. A load pulls the blocks straight into the paged cache over the configured data channel
     (puller.py), or, with overlap, copies them from the request's prefetch (prefetch.py: a
     stream pull into staging started while the prefill ran; a failed or skipped prefetch
     falls back to a normal pull); then it releases the producer's lease.
  3. `collect` reports completed loads as finished receiving (failed ones also as failed),
     with their TransferStats; loads of requests that finished meanwhile are cancelled.
  4. `shutdown` cancels loads and prefetches and joins every thread it started.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
from vllm.logger import init_logger

from kv_transfer.channels.base import ChannelOptions, WorkerIdentity
from kv_transfer.config import ConnectorConfig
from kv_transfer.layout import KVLayout
from kv_transfer.metadata import LoadSpec, ReleaseSpec
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.params import PrefetchSpec, TransferStats
from kv_transfer.prefetch import Prefetch, Prefetcher
from kv_transfer.puller import KVPuller
from kv_transfer.transport import PullResult, TransferError

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


class ConsumerWorker:
    """Loads remote prompts' blocks into one worker's paged cache."""

    def __init__(self, config: ConnectorConfig, cache: PagedKVCache, layout: KVLayout,
                 identity: WorkerIdentity) -> None:
        self._cache = cache
        self._pull_timeout_s = config.pull_timeout_s
        self._client = KVPuller(
            cache, config.channel, auth_token=config.auth_token.get_secret_value(),
            max_chunk_bytes=config.max_chunk_bytes, num_streams=config.num_streams,
            layout=layout, options=ChannelOptions(identity, config.group_timeout_s),
        )
        self._pool = ThreadPoolExecutor(config.num_pull_threads, thread_name_prefix="kv-pull")
        self._loads: dict[str, _Load] = {}
        self._recent_errors: OrderedDict[str, str] = OrderedDict()
        self.num_loads_done = 0
        self.num_loads_failed = 0
        self.loaded_bytes = 0
        self.num_loads_overlapped = 0
        self._stopped = threading.Event()
        self._prefetcher: Prefetcher | None = None
        self._reaper: threading.Thread | None = None
        if config.overlap:
            self._prefetcher = Prefetcher(
                cache, self._client, max_bytes=config.max_prefetch_bytes,
                ttl_s=config.pull_timeout_s + config.lease_s, timeout_s=config.pull_timeout_s,
                num_threads=config.num_pull_threads,
            )
            self._reaper = threading.Thread(target=self._reap_prefetches,
                                            name="kv-prefetch-reaper", daemon=True)
            self._reaper.start()

    def prefetch(self, spec: PrefetchSpec) -> bool:
        """Start pulling a prompt still being prefilled; False if skipped."""
        if self._prefetcher is None:
            # A silent refusal made every overlapped request fall back to a normal pull.
            logger.warning_once("prefetch refused: overlap is off on this decode engine "
                                "(TransferConfig.overlap); the KV is pulled after the prefill")
            return False
        return self._prefetcher.start(spec)

    def cancel_prefetch(self, stream_handle: str) -> None:
        if self._prefetcher is not None:
            self._prefetcher.cancel(stream_handle)

    def start(self, loads: list[LoadSpec], releases: list[ReleaseSpec]) -> None:
        """Begin this step's loads and releases (returns at once)."""
        for spec in loads:
            load = _Load(spec, Future())
            self._loads[spec.request_id] = load
            self._pool.submit(self._run_load, load)
        for release in releases:
            self._pool.submit(self._client.release, release.endpoint, release.handle,
                              RELEASE_TIMEOUT_S)

    def collect(self, finished_req_ids: set[str], results: KVConnectorTransferResults,
                stats: dict[str, TransferStats]) -> None:
        """Cancel the loads of finished requests; move completed loads into results (and
        their TransferStats into stats)."""
        for request_id in finished_req_ids:
            if (load := self._loads.get(request_id)) is not None:
                load.cancelled.set()  # aborted while loading
        for request_id, load in list(self._loads.items()):
            if not load.future.done():
                continue
            del self._loads[request_id]
            results.finished_recving.add(request_id)
            stats[request_id] = self._finish_load(load, results)

    @property
    def num_loads_in_flight(self) -> int:
        return len(self._loads)

    @property
    def num_prefetches(self) -> int:
        return self._prefetcher.num_prefetches if self._prefetcher is not None else 0

    @property
    def prefetch_bytes(self) -> int:
        return self._prefetcher.bytes_in_use if self._prefetcher is not None else 0

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
            self._reaper.join()
        for load in self._loads.values():
            load.cancelled.set()
        if self._prefetcher is not None:
            self._prefetcher.shutdown()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def _run_load(self, load: _Load) -> None:
        spec = load.spec
        try:
            result = self._load_prefetched(load)
            if result is None:
                result = self._client.pull(
                    spec.endpoint,
                    spec.handle,
                    list(spec.remote_block_ids),
                    list(spec.local_block_ids),
                    timeout_s=self._pull_timeout_s,
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
        deadline = time.monotonic() + self._pull_timeout_s
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
            self.num_loads_done += 1
            self.num_loads_overlapped += load.overlapped
            self.loaded_bytes += pulled.transfer_bytes
            exposed_ms = (load.done_at - load.started_at) * 1e3
            return TransferStats(spec.num_tokens, pulled.num_blocks, pulled.transfer_bytes,
                                 pulled.transfer_ms, exposed_transfer_ms=exposed_ms,
                                 overlapped=load.overlapped)
        self.num_loads_failed += 1
        results.failed_recving.add(spec.request_id)
        reason = str(err) if isinstance(err, TransferError) else f"{type(err).__name__}: {err}"
        logger.warning("KV load for request %s failed: %s", spec.request_id, reason)
        self._recent_errors[spec.request_id] = reason
        if len(self._recent_errors) > NUM_RECENT_ERRORS:
            self._recent_errors.popitem(last=False)
        return TransferStats(0, 0, 0, 0.0, error=reason)

    def _reap_prefetches(self) -> None:
        assert self._prefetcher is not None, "prefetch reaper without prefetches"
        while not self._stopped.wait(MAX_REAP_INTERVAL_S):
            self._prefetcher.expire()
