"""Scheduler side of the disagg connector (runs in the engine core, next to vLLM's scheduler).

Producer lifecycle of a request (kv_transfer_params: do_remote_decode):
  1. The prompt is prefilled as usual (max_tokens=1).
  2. `request_finished` keeps the prompt's blocks (delay free), mints an unguessable handle and
     returns TransferParams on the request's output.
  1b. Overlap: if the request carries a stream handle, each step that computes part of its
     prompt tells the worker the request's blocks and the tokens the step computes
     (StreamStep), so the worker can serve them layer by layer while the prefill runs; a
     request that will not hand its blocks off (aborted, preempted) ends its stream (StreamEnd).
  3. The next `build_connector_meta` tells the worker to grant the lease (the engine steps once
     more for that, `has_pending_push_work`); once the consumer releases the lease or it
     expires, the worker reports the blocks as finished sending at the engine's next step and
     vLLM returns them to its pool. An idle engine does not step just to poll: vLLM's engine
     core busy-waits on its worker during a step, so polling would burn a core.
Consumer lifecycle (kv_transfer_params: do_remote_prefill + TransferParams):
  1. `get_num_new_matched_tokens` reports the prompt tokens the producer holds as external,
     loaded asynchronously.
  2. `update_state_after_alloc` pairs remote and local block ids; `build_connector_meta` hands
     the load to the worker; the request waits in WAITING_FOR_REMOTE_KVS.
  3. The worker reports the load finished (or failed: vLLM then fails the request or recomputes
     it, per kv_load_failure_policy) with its TransferStats, returned on the request's output.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger
from vllm.v1.request import RequestStatus

from kv_transfer.config import ConnectorConfig
from kv_transfer.metadata import (
    DisaggConnectorMetadata,
    DisaggWorkerMetadata,
    LeaseSpec,
    LoadSpec,
    ReleaseSpec,
    StreamEnd,
    StreamStep,
)
from kv_transfer.params import (
    CONSUME_KEY,
    TransferParams,
    TransferStats,
    is_consumer_request,
    is_producer_request,
    parse_transfer,
    stats_output_params,
    stream_handle_of,
    transfer_output_params,
)

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)
_HANDOFF_STATUSES = (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _Streaming:
    """A producer request whose prompt is being prefilled with its blocks streamed."""

    handle: str
    num_prompt_tokens: int
    block_ids: list[int] = field(default_factory=list)


class ConnectorScheduler:
    def __init__(self, config: ConnectorConfig, block_size: int) -> None:
        self._config = config
        self._block_size = block_size
        self._loads: list[LoadSpec] = []
        self._leases: list[LeaseSpec] = []
        self._releases: list[ReleaseSpec] = []
        self._held: set[str] = set()
        self._stats: dict[str, TransferStats] = {}
        self._loading: set[str] = set()
        self._streaming: dict[str, _Streaming] = {}  # by request id, while prefilling
        self._stream_ends: list[StreamEnd] = []

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        transfer = self._transfer_to_load(request)
        if transfer is None:
            return 0, False
        count = self._num_loadable_tokens(request, transfer) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        handle = stream_handle_of(request.kv_transfer_params)
        if handle and is_producer_request(request.kv_transfer_params):
            if self._config.overlap:
                self._streaming[request.request_id] = _Streaming(handle,
                                                                 request.num_prompt_tokens)
            else:
                self._stream_ends.append(StreamEnd(handle, "overlap is off on this producer"))
        transfer = self._transfer_to_load(request)
        if transfer is None:
            return
        assert request.kv_transfer_params is not None
        request.kv_transfer_params[CONSUME_KEY] = False  # one load per request, even if preempted
        if num_external_tokens == 0:
            self._releases.append(ReleaseSpec(transfer.endpoint, transfer.handle))
            return
        num_loadable = self._num_loadable_tokens(request, transfer)
        first = (num_loadable - num_external_tokens) // self._block_size
        last = _ceil_div(num_loadable, self._block_size)
        self._loading.add(request.request_id)
        (local_ids,) = blocks.get_block_ids()
        assert len(local_ids) >= last, f"{len(local_ids)} local blocks for {last} needed"
        self._loads.append(
            LoadSpec(
                request_id=request.request_id,
                endpoint=transfer.endpoint,
                handle=transfer.handle,
                remote_block_ids=transfer.block_ids[first:last],
                local_block_ids=tuple(local_ids[first:last]),
                num_tokens=num_external_tokens,
                stream_handle=transfer.stream_handle if self._config.overlap else "",
                first_block_index=first,
            )
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> DisaggConnectorMetadata:
        meta = DisaggConnectorMetadata(
            loads=self._loads,
            leases=self._leases,
            releases=self._releases,
            stream_steps=self._stream_steps(scheduler_output) if self._streaming else [],
            stream_ends=self._stream_ends,
        )
        self._loads, self._leases, self._releases, self._stream_ends = [], [], [], []
        return meta

    def _stream_steps(self, scheduler_output: SchedulerOutput) -> list[StreamStep]:
        for request_id in scheduler_output.preempted_req_ids or ():
            if (streaming := self._streaming.pop(request_id, None)) is not None:
                self._stream_ends.append(StreamEnd(streaming.handle, "the prefill was preempted"))
        scheduled: list[tuple[str, list[int] | None, int, bool]] = [
            (new.req_id, new.block_ids[0], new.num_computed_tokens, True)
            for new in scheduler_output.scheduled_new_reqs
        ]
        cached = scheduler_output.scheduled_cached_reqs
        for i, request_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            scheduled.append((request_id, new_ids[0] if new_ids else None,
                              cached.num_computed_tokens[i], request_id in cached.resumed_req_ids))
        steps = []
        for request_id, block_ids, num_computed, replaces in scheduled:
            streaming = self._streaming.get(request_id)
            if streaming is None:
                continue
            if replaces:
                streaming.block_ids = list(block_ids or ())
            else:
                streaming.block_ids.extend(block_ids or ())
            num_target = num_computed + scheduler_output.num_scheduled_tokens.get(request_id, 0)
            steps.append(StreamStep(streaming.handle, request_id, streaming.num_prompt_tokens,
                                    tuple(streaming.block_ids), num_computed, num_target))
            if num_target >= streaming.num_prompt_tokens:
                del self._streaming[request_id]  # prompt done: nothing more to announce
        return steps

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._held.difference_update(connector_output.finished_sending or ())
        worker_meta = connector_output.kv_connector_worker_meta
        if isinstance(worker_meta, DisaggWorkerMetadata):
            # A failed load can finish its request before its stats arrive: keep only the
            # stats of requests still alive, so nothing accumulates.
            self._stats.update(
                (rid, stats) for rid, stats in worker_meta.stats.items() if rid in self._loading
            )

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        if is_producer_request(params):
            self._streaming.pop(request.request_id, None)
            delay_free, output = self._hand_off(request, block_ids)
            if not delay_free and (handle := stream_handle_of(params)):
                self._stream_ends.append(StreamEnd(handle, "the prefill ended without a "
                                                   f"handoff ({request.status.name})"))
            return delay_free, output
        if is_consumer_request(params):
            # Finished before its blocks were allocated (aborted while waiting): free the
            # producer's lease now instead of at its expiry.
            transfer = parse_transfer(params)
            assert transfer is not None
            self._releases.append(ReleaseSpec(transfer.endpoint, transfer.handle))
        self._loading.discard(request.request_id)
        stats = self._stats.pop(request.request_id, None)
        return False, (stats_output_params(stats) if stats else None)

    def has_pending_work(self) -> bool:
        """True while lease grants or releases wait to reach the worker."""
        return bool(self._leases or self._releases or self._stream_ends)

    @property
    def num_held_requests(self) -> int:
        """Producer requests whose blocks vLLM still keeps for a consumer."""
        return len(self._held)

    def _hand_off(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        if request.status not in _HANDOFF_STATUSES:
            return False, None  # aborted or errored: nothing to hand off, free at once
        num_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
        leased = tuple(block_ids[: _ceil_div(num_tokens, self._block_size)])
        if num_tokens == 0 or not leased:
            return False, None
        handle = secrets.token_urlsafe(24)
        self._leases.append(LeaseSpec(request.request_id, handle, leased, self._config.lease_s))
        self._held.add(request.request_id)
        transfer = TransferParams(
            endpoint=self._config.endpoint,
            handle=handle,
            block_ids=leased,
            num_tokens=num_tokens,
            block_size=self._block_size,
            lease_s=self._config.lease_s,
            stream_handle=stream_handle_of(request.kv_transfer_params),
        )
        return True, transfer_output_params(transfer)

    def _transfer_to_load(self, request: Request) -> TransferParams | None:
        if not is_consumer_request(request.kv_transfer_params):
            return None
        transfer = parse_transfer(request.kv_transfer_params)
        if transfer is not None and transfer.block_size != self._block_size:
            # Never raise here (it would take the engine down): compute the prompt locally;
            # request_finished still releases the producer's lease.
            logger.error(
                "request %s: producer block size %d != consumer block size %d; "
                "recomputing the prompt locally", request.request_id, transfer.block_size,
                self._block_size,
            )
            return None
        return transfer

    @staticmethod
    def _num_loadable_tokens(request: Request, transfer: TransferParams) -> int:
        """All the producer has, but never the prompt's last token: vLLM computes at least one
        (a continuation's last token is the first one sampled, which the producer never had;
        a seeded request resamples its first token from the prompt's last one)."""
        return min(transfer.num_tokens, request.num_prompt_tokens - 1)
