"""The connector's worker side over real KV servers on loopback (no engine, no Ray): the
producer and consumer sides as separate classes, composed for kv_both."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kv_transfer.config import ConnectorConfig
from kv_transfer.connector_worker import ConnectorWorker
from kv_transfer.metadata import DisaggConnectorMetadata, LeaseSpec, LoadSpec

TOKEN = "t" * 32
NUM_BLOCKS = 8


def _caches() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {f"layer.{i}": torch.randn((NUM_BLOCKS, 2, 4, 16), generator=gen) for i in range(2)}


def _kv_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("kv-"))


@pytest.mark.parametrize("channel", ["grpc", "tcp"])
def test_kv_both_runs_both_sides_and_joins_every_thread_at_shutdown(channel):
    assert _kv_threads() == [], "another test left transfer threads behind"
    config = ConnectorConfig(auth_token=TOKEN, data_channel=channel, overlap=True,
                             max_chunk_bytes=4096)
    worker = ConnectorWorker(config, is_producer=True, is_consumer=True, num_blocks=NUM_BLOCKS,
                             block_size=4)
    caches = _caches()
    worker.register_kv_caches(caches)
    assert worker.producer is not None and worker.consumer is not None
    # 1. Both reapers run, once each.
    assert _kv_threads().count("kv-lease-reaper") == 1
    assert _kv_threads().count("kv-prefetch-reaper") == 1
    # 2. The producer side leases blocks 1 and 2; the consumer side loads them into 5 and 6.
    worker.start_load_kv(DisaggConnectorMetadata(
        leases=[LeaseSpec("req-p", "h1", (1, 2), lease_s=10.0)],
        loads=[LoadSpec("req-c", worker.producer.endpoint, "h1", (1, 2), (5, 6), 8)],
    ))
    sent: set[str] = set()
    received: set[str] = set()
    deadline = time.monotonic() + 10
    while (sent, received) != ({"req-p"}, {"req-c"}) and time.monotonic() < deadline:
        results = worker.get_transfer_results(set())
        sent |= results.finished_sending
        received |= results.finished_recving
        assert not results.failed_recving, worker.load_error("req-c")
        time.sleep(0.02)
    assert (sent, received) == ({"req-p"}, {"req-c"})
    for layer in caches.values():
        assert torch.equal(layer[5], layer[1]) and torch.equal(layer[6], layer[2])
    # 3. Stats merge both sides; the load's TransferStats go to the scheduler once.
    stats = worker.stats()
    assert (stats.num_leases, stats.num_loads_done, stats.num_loads_in_flight) == (0, 1, 0)
    assert stats.loaded_bytes == 2 * 2 * caches["layer.0"][0].numel() * 4
    meta = worker.build_worker_meta()
    assert meta is not None and meta.stats["req-c"].num_loaded_blocks == 2
    assert worker.build_worker_meta() is None
    # 4. Shutdown stops both sides and joins every thread they started.
    worker.shutdown()
    assert _kv_threads() == []


def test_a_consumer_only_worker_refuses_leases_and_reports_no_producer_state():
    config = ConnectorConfig(auth_token=TOKEN)
    worker = ConnectorWorker(config, is_producer=False, is_consumer=True, num_blocks=NUM_BLOCKS)
    worker.register_kv_caches(_caches())
    assert worker.producer is None and worker.stats().num_leases == 0
    with pytest.raises(AssertionError, match="leases on a non-producer"):
        worker.start_load_kv(DisaggConnectorMetadata(leases=[LeaseSpec("r", "h", (1,), 1.0)]))
    assert worker.get_transfer_results(set()).finished_sending == set()
    worker.shutdown()
    assert _kv_threads() == []
