"""Consumer-side prefetches: a prompt's KV pulled into staging while the producer prefills it.

Lifecycle of a prefetch (one per stream handle, in the consumer's worker process):
  1. `start`, as soon as the pipeline sends the prefill off: a staging buffer of the prompt's
     size (the paged cache's layout, prompt block i in staging block i) is allocated if the
     configured cap allows, and a stream pull fills it as the producer computes layers.
  2. The decode request's load `claim`s it by handle (its TransferParams carry the handle),
     waits for whatever has not arrived yet, copies the staged blocks into the request's
     paged blocks and `free`s the staging. A failed or refused prefetch gives the load
     nothing: it pulls from the producer's lease as without overlap.
  3. A prefetch nobody claims is cancelled by `cancel` (the pipeline gave up) or after ttl_s
     (`expire`); its staging is freed once its pull thread has let go of it.
Thread-safe: vLLM's worker thread starts and claims; pull threads fill.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from vllm.logger import init_logger

from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.params import PrefetchSpec
from kv_transfer.transport import KVBlockClient, PullResult, TransferError

logger = init_logger(__name__)


@dataclass
class Prefetch:
    spec: PrefetchSpec
    staging: PagedKVCache | None
    num_bytes: int
    future: Future[PullResult] = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started_at: float = field(default_factory=time.monotonic)
    freed: bool = False

    def wait(self, deadline: float, cancelled: threading.Event | None) -> PullResult:
        """The finished pull (raises TransferError if it failed, passed deadline, or the
        waiting load was cancelled)."""
        while True:
            if cancelled is not None and cancelled.is_set():
                raise TransferError("load cancelled: request aborted")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransferError("prefetch did not finish before the pull deadline")
            try:
                return self.future.result(min(remaining, 0.05))
            except TimeoutError:
                continue
            except TransferError:
                raise
            except Exception as err:  # noqa: BLE001 - any pull failure means: pull again
                raise TransferError(f"prefetch failed: {type(err).__name__}: {err}") from err


class Prefetcher:
    """The prefetches of one consumer worker."""

    def __init__(self, cache: PagedKVCache, client: KVBlockClient, *, max_bytes: int,
                 ttl_s: float, timeout_s: float, num_threads: int) -> None:
        self._cache = cache
        self._client = client
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="kv-prefetch")
        self._lock = threading.Lock()
        self._prefetches: dict[str, Prefetch] = {}
        self._bytes_in_use = 0
        self.num_skipped = 0

    def start(self, spec: PrefetchSpec) -> bool:
        """Begin pulling the stream into staging; False if skipped (over the cap, known handle
        or nothing to pull). Returns at once."""
        num_bytes = spec.num_blocks * self._cache.block_bytes
        with self._lock:
            if (spec.stream_handle in self._prefetches or spec.num_blocks == 0
                    or self._bytes_in_use + num_bytes > self._max_bytes):
                self.num_skipped += 1
                return False
            self._bytes_in_use += num_bytes
            prefetch = Prefetch(spec, None, num_bytes)
            self._prefetches[spec.stream_handle] = prefetch
        try:
            prefetch.staging = self._cache.staging(spec.num_blocks)
        except RuntimeError as err:  # out of memory
            logger.warning("prefetch of %d B skipped: %s", num_bytes, err)
            with self._lock:
                del self._prefetches[spec.stream_handle]
            self.free(prefetch)
            return False
        self._pool.submit(self._run, prefetch)
        return True

    def claim(self, stream_handle: str) -> Prefetch | None:
        """Take a prefetch for a load (the caller must `free` it), or None if there is none."""
        with self._lock:
            return self._prefetches.pop(stream_handle, None)

    def cancel(self, stream_handle: str) -> None:
        """Drop an unclaimed prefetch (idempotent)."""
        prefetch = self.claim(stream_handle)
        if prefetch is not None:
            self._drop(prefetch)

    def expire(self) -> None:
        """Drop prefetches nobody claimed within ttl_s."""
        now = time.monotonic()
        with self._lock:
            stale = [h for h, p in self._prefetches.items() if now - p.started_at > self._ttl_s]
            dropped = [self._prefetches.pop(h) for h in stale]
        for prefetch in dropped:
            self._drop(prefetch)

    def free(self, prefetch: Prefetch) -> None:
        """Give back a claimed prefetch's staging (exactly once; later calls do nothing)."""
        with self._lock:
            if prefetch.freed:
                return
            prefetch.freed = True
            prefetch.staging = None
            self._bytes_in_use -= prefetch.num_bytes

    @property
    def num_prefetches(self) -> int:
        with self._lock:
            return len(self._prefetches)

    @property
    def bytes_in_use(self) -> int:
        with self._lock:
            return self._bytes_in_use

    def shutdown(self) -> None:
        with self._lock:
            prefetches, self._prefetches = list(self._prefetches.values()), {}
        for prefetch in prefetches:
            prefetch.cancelled.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _drop(self, prefetch: Prefetch) -> None:
        prefetch.cancelled.set()
        prefetch.future.add_done_callback(lambda _: self.free(prefetch))

    def _run(self, prefetch: Prefetch) -> None:
        spec, staging = prefetch.spec, prefetch.staging
        assert staging is not None, "prefetch without staging"
        indices = list(range(spec.num_blocks))
        try:
            result = self._client.pull(spec.endpoint, "", indices, indices, self._timeout_s,
                                       prefetch.cancelled, sink=staging,
                                       stream_handle=spec.stream_handle)
        except BaseException as err:  # noqa: BLE001 - the load falls back to a normal pull
            self.free(prefetch)
            prefetch.future.set_exception(err)
        else:
            prefetch.future.set_result(result)
