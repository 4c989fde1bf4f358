"""Worker side of the disagg connector (runs in the vLLM worker process, next to the KV tensors).

vLLM builds one worker-side connector per worker process and calls it each step. The two roles
are separate classes, built once the KV tensors are registered: `ProducerWorker`
(producer_worker.py: serves leased and streamed blocks) for kv_producer, `ConsumerWorker`
(consumer_worker.py: loads and prefetches) for kv_consumer, both for kv_both. This class routes
each call to the side that owns it and merges what both report.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from kv_transfer.channels.base import WorkerIdentity
from kv_transfer.config import ConnectorConfig
from kv_transfer.consumer_worker import ConsumerWorker
from kv_transfer.layout import KVLayout
from kv_transfer.metadata import DisaggConnectorMetadata, DisaggWorkerMetadata
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.params import PrefetchSpec, TransferStats
from kv_transfer.producer_worker import ProducerWorker


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
        self._is_producer = is_producer  # kv_both: both sides
        self._is_consumer = is_consumer
        self._num_blocks = num_blocks
        self._identity = WorkerIdentity(config.collective_backend, tp_size, tp_rank)
        self._block_size = block_size
        self._model_layout = (num_kv_heads, head_dim)
        self.producer: ProducerWorker | None = None
        self.consumer: ConsumerWorker | None = None
        self._done_stats: dict[str, TransferStats] = {}

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Build this worker's sides over its KV tensors. Called exactly once."""
        assert self.producer is None and self.consumer is None, "KV caches registered twice"
        cache = PagedKVCache(kv_caches, self._num_blocks)
        num_kv_heads, head_dim = self._model_layout
        layout = KVLayout.of_cache(cache, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                   block_size=self._block_size)
        if self._is_producer:
            self.producer = ProducerWorker(self._config, cache, layout, self._identity,
                                           self._block_size)
        if self._is_consumer:
            self.consumer = ConsumerWorker(self._config, cache, layout, self._identity)

    def begin_step(self, meta: DisaggConnectorMetadata) -> None:
        """Before the step's forward pass (bind_connector_metadata)."""
        if self.producer is not None:
            self.producer.begin_step(meta)

    def layer_saved(self, layer_name: str) -> None:
        if self.producer is not None:
            self.producer.layer_saved(layer_name)

    def step_saved(self) -> None:
        if self.producer is not None:
            self.producer.step_saved()

    def prefetch(self, spec: PrefetchSpec) -> bool:
        """Consumer: start pulling a prompt still being prefilled; False if skipped."""
        return self.consumer is not None and self.consumer.prefetch(spec)

    def cancel_prefetch(self, stream_handle: str) -> None:
        if self.consumer is not None:
            self.consumer.cancel_prefetch(stream_handle)

    def start_load_kv(self, meta: DisaggConnectorMetadata) -> None:
        if meta.leases:
            assert self.producer is not None, "leases on a non-producer"
            self.producer.grant(meta.leases)
        if meta.loads or meta.releases:
            assert self.consumer is not None, "loads on a non-consumer"
            self.consumer.start(meta.loads, meta.releases)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        results = KVConnectorTransferResults()
        if self.producer is not None:
            results.finished_sending = self.producer.take_freed()
        if self.consumer is not None:
            self.consumer.collect(finished_req_ids, results, self._done_stats)
        return results

    def build_worker_meta(self) -> DisaggWorkerMetadata | None:
        if not self._done_stats:
            return None
        meta, self._done_stats = DisaggWorkerMetadata(self._done_stats), {}
        return meta

    def stats(self) -> WorkerStats:
        producer, consumer = self.producer, self.consumer
        return WorkerStats(
            num_leases=producer.leases.num_leases if producer else 0,
            num_leased_blocks=producer.leases.num_leased_blocks if producer else 0,
            num_loads_in_flight=consumer.num_loads_in_flight if consumer else 0,
            num_loads_done=consumer.num_loads_done if consumer else 0,
            num_loads_failed=consumer.num_loads_failed if consumer else 0,
            loaded_bytes=consumer.loaded_bytes if consumer else 0,
            num_streams=producer.num_streams if producer else 0,
            num_prefetches=consumer.num_prefetches if consumer else 0,
            prefetch_bytes=consumer.prefetch_bytes if consumer else 0,
            num_loads_overlapped=consumer.num_loads_overlapped if consumer else 0,
        )

    def load_error(self, request_id: str) -> str:
        """Why the load of a recent request failed ('' if it did not or is forgotten)."""
        return self.consumer.load_error(request_id) if self.consumer is not None else ""

    def shutdown(self) -> None:
        """Stop both sides, consumer first (its pulls may read from this worker's producer);
        every thread they started is joined."""
        if self.consumer is not None:
            self.consumer.shutdown()
        if self.producer is not None:
            self.producer.shutdown()
