"""Scheduler side of the connector, driven with stand-in vLLM requests (no engine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from vllm.v1.request import RequestStatus

from kv_transfer.config import ConnectorConfig
from kv_transfer.connector_scheduler import ConnectorScheduler
from kv_transfer.metadata import DisaggWorkerMetadata
from kv_transfer.params import (
    TransferParams,
    TransferStats,
    consumer_request_params,
    parse_stats,
    parse_transfer,
    producer_request_params,
)

BS = 16


@dataclass
class FakeRequest:
    request_id: str
    num_prompt_tokens: int
    kv_transfer_params: dict[str, Any] | None
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.FINISHED_LENGTH_CAPPED


@dataclass
class FakeBlocks:
    ids: list[int] = field(default_factory=list)

    def get_block_ids(self) -> tuple[list[int]]:
        return (self.ids,)


@dataclass
class FakeOutput:
    finished_sending: set[str] | None = None
    kv_connector_worker_meta: Any = None


def _scheduler() -> ConnectorScheduler:
    config = ConnectorConfig(port=5555, auth_token="t" * 32, lease_s=7)
    return ConnectorScheduler(config, block_size=BS)


def _transfer(num_tokens: int) -> TransferParams:
    num_blocks = -(-num_tokens // BS)
    return TransferParams("127.0.0.1:5555", "handle", tuple(range(100, 100 + num_blocks)),
                          num_tokens, BS, 7.0)


def test_producer_hands_off_exactly_the_prompt_blocks():
    sched = _scheduler()
    request = FakeRequest("p1", 40, producer_request_params(), num_computed_tokens=40)
    delay_free, params = sched.request_finished(request, [7, 8, 9, 10])
    assert delay_free
    transfer = parse_transfer(params)
    assert transfer is not None
    assert transfer.block_ids == (7, 8, 9) and transfer.num_tokens == 40
    assert transfer.endpoint == "127.0.0.1:5555" and len(transfer.handle) >= 32
    meta = sched.build_connector_meta(None)  # type: ignore[arg-type]
    assert [(lease.request_id, lease.block_ids) for lease in meta.leases] == [("p1", (7, 8, 9))]
    assert sched.num_held_requests == 1
    sched.update_connector_output(FakeOutput(finished_sending={"p1"}))  # type: ignore[arg-type]
    assert sched.num_held_requests == 0


def test_handles_are_unguessable_and_distinct():
    sched = _scheduler()
    handles = set()
    for i in range(50):
        request = FakeRequest(f"p{i}", 5, producer_request_params(), num_computed_tokens=5)
        handles.add(parse_transfer(sched.request_finished(request, [i])[1]).handle)
    assert len(handles) == 50


def test_aborted_producer_request_frees_at_once():
    sched = _scheduler()
    request = FakeRequest("p2", 40, producer_request_params(), num_computed_tokens=16,
                          status=RequestStatus.FINISHED_ABORTED)
    assert sched.request_finished(request, [1, 2, 3]) == (False, None)
    assert sched.build_connector_meta(None).leases == []  # type: ignore[arg-type]


@pytest.mark.parametrize(("local_hit", "expected_remote"), [(0, (100, 101, 102)), (16, (101, 102))])
def test_consumer_loads_what_the_local_cache_lacks(local_hit: int, expected_remote):
    sched = _scheduler()
    transfer = _transfer(40)  # 3 blocks, the last one partial
    request = FakeRequest("d1", 41, consumer_request_params(transfer))  # prompt + first token
    count, is_async = sched.get_num_new_matched_tokens(request, local_hit)
    assert (count, is_async) == (40 - local_hit, True)
    sched.update_state_after_alloc(request, FakeBlocks([5, 6, 7, 8]), count)
    (load,) = sched.build_connector_meta(None).loads  # type: ignore[arg-type]
    assert load.remote_block_ids == expected_remote
    assert load.local_block_ids == tuple([5, 6, 7][local_hit // BS:])
    # one load per request, even if vLLM asks again (preemption)
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)


def test_consumer_with_everything_cached_locally_releases_the_lease():
    sched = _scheduler()
    request = FakeRequest("d2", 33, consumer_request_params(_transfer(32)))
    assert sched.get_num_new_matched_tokens(request, 32) == (0, False)
    sched.update_state_after_alloc(request, FakeBlocks([1, 2, 3]), 0)
    meta = sched.build_connector_meta(None)  # type: ignore[arg-type]
    assert meta.loads == [] and [r.handle for r in meta.releases] == ["handle"]


def test_consumer_aborted_before_allocation_releases_the_lease():
    sched = _scheduler()
    request = FakeRequest("d3", 20, consumer_request_params(_transfer(19)),
                          status=RequestStatus.FINISHED_ABORTED)
    assert sched.request_finished(request, []) == (False, None)
    assert [r.handle for r in sched.build_connector_meta(None).releases] == ["handle"]  # type: ignore[arg-type]


def test_transfer_stats_reach_the_consumer_output_and_nothing_lingers():
    sched = _scheduler()
    request = FakeRequest("d4", 20, consumer_request_params(_transfer(19)))
    sched.update_state_after_alloc(request, FakeBlocks([1, 2]), 19)
    stats = TransferStats(19, 2, 1024, 1.5)
    meta = DisaggWorkerMetadata({"d4": stats, "gone": stats})
    sched.update_connector_output(FakeOutput(kv_connector_worker_meta=meta))  # type: ignore[arg-type]
    assert parse_stats(sched.request_finished(request, [1, 2])[1]) == stats
    assert sched._stats == {}, "stats of finished or unknown requests must not accumulate"


def test_block_size_mismatch_recomputes_instead_of_crashing_the_engine():
    sched = _scheduler()
    bad = TransferParams("127.0.0.1:5555", "handle", (1,), 8, 8, 7.0)
    request = FakeRequest("d5", 9, consumer_request_params(bad))
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)
    sched.request_finished(request, [])
    assert [r.handle for r in sched.build_connector_meta(None).releases] == ["handle"]  # type: ignore[arg-type]
