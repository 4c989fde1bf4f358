"""Consumer side of the collective transport: one lazily built pair group per producer, control
calls over gRPC (the lifecycle of a pull is in collective_transport.py).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import grpc
import torch
from torch.distributed import TCPStore

from kv_transfer.collective import CONSUMER_RANK, GroupError, PairGroup, staging_device
from kv_transfer.collective_transport import STALE_GROUP, WorkerIdentity
from kv_transfer.grpc_client import GrpcKVClient
from kv_transfer.grpc_transport import JOIN_METHOD, PULL_COLLECTIVE_METHOD, describe_rpc_error
from kv_transfer.paged_kv import ChunkPlan, PagedKVCache
from kv_transfer.transport import KVBlockClient, PullResult, TransferError
from protos import kv_transfer_pb2 as pb


@dataclass
class _ConsumerGroup:
    name: str
    pair: PairGroup
    lock: threading.Lock = field(default_factory=threading.Lock)
    staging: torch.Tensor | None = None


class CollectiveKVClient(KVBlockClient):
    """Consumer side: pulls over a lazily built group per producer endpoint; control calls
    (JoinGroup, PullCollective, Release) go over the `control` gRPC client's channels."""

    def __init__(self, cache: PagedKVCache, identity: WorkerIdentity, control: GrpcKVClient,
                 max_chunk_bytes: int) -> None:
        self._cache = cache
        self._identity = identity
        self._control = control
        self._metadata = control.metadata
        self._max_chunk_bytes = max_chunk_bytes
        self._peer_id = secrets.token_hex(8)  # a restarted consumer is a new peer
        self._groups: dict[str, _ConsumerGroup] = {}  # by producer endpoint
        self._lock = threading.Lock()
        self.num_joins = 0

    def pull(self, endpoint: str, handle: str, remote_block_ids: list[int],
             local_block_ids: list[int], timeout_s: float,
             cancelled: threading.Event | None = None, *, sink: PagedKVCache | None = None,
             stream_handle: str = "") -> PullResult:
        assert len(remote_block_ids) == len(local_block_ids), "remote/local block count differs"
        target = sink or self._cache
        target.check_block_ids(local_block_ids)
        start = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        request = pb.PullRequest(handle=handle, block_ids=remote_block_ids,
                                 max_chunk_bytes=self._max_chunk_bytes,
                                 stream_handle=stream_handle)
        for attempt in range(2):
            entry = self._group(endpoint, deadline)
            try:
                with entry.lock:
                    num_bytes, wait_s = self._pull_on(entry, endpoint, request, target,
                                                      local_block_ids, deadline, cancelled)
                return PullResult(len(local_block_ids), num_bytes,
                                  (time.perf_counter() - start) * 1e3, wait_s * 1e3)
            except _StaleGroup:
                self._forget(endpoint, entry)
                if attempt == 1:
                    raise TransferError(f"producer {endpoint} refused two fresh transfer "
                                        "groups") from None
            except _Refused as err:
                raise TransferError(str(err)) from err.__cause__  # the group stays usable
            except BaseException:
                self._forget(endpoint, entry)
                raise
        raise AssertionError("unreachable")

    def release(self, endpoint: str, handle: str, timeout_s: float) -> None:
        self._control.release(endpoint, handle, timeout_s)

    def close(self) -> None:
        with self._lock:
            groups, self._groups = list(self._groups.values()), {}
        for entry in groups:
            entry.pair.close()
        self._control.close()

    @property
    def num_groups(self) -> int:
        with self._lock:
            return len(self._groups)

    def _group(self, endpoint: str, deadline: float) -> _ConsumerGroup:
        with self._lock:
            entry = self._groups.get(endpoint)
        if entry is not None and not entry.pair.is_closed:
            return entry
        self._control.handshake(endpoint, max(0.1, deadline - time.monotonic()))
        join = self._control.channel(endpoint).unary_unary(
            JOIN_METHOD, request_serializer=pb.JoinRequest.SerializeToString,
            response_deserializer=pb.JoinResponse.FromString,
        )
        hello = pb.JoinRequest(
            peer_id=self._peer_id, backend=self._identity.backend,
            tp_size=self._identity.tp_size, tp_rank=self._identity.tp_rank,
            block_bytes_per_layer=self._cache.block_bytes_per_layer,
        )
        try:
            answer = join(hello, timeout=max(0.1, deadline - time.monotonic()),
                          metadata=self._metadata)
        except grpc.RpcError as err:
            raise TransferError(describe_rpc_error(err, endpoint)) from err
        host = endpoint.rsplit(":", 1)[0]
        try:
            store = TCPStore(host, answer.store_port, is_master=False,
                             timeout=timedelta(seconds=answer.timeout_s))
            pair = PairGroup(answer.group_name, self._identity.backend, CONSUMER_RANK, store,
                             answer.timeout_s)
        except (GroupError, RuntimeError) as err:
            raise TransferError(f"transfer group with {endpoint} failed: {err}") from err
        self.num_joins += 1
        entry = _ConsumerGroup(answer.group_name, pair)
        with self._lock:
            self._groups[endpoint] = entry
        return entry

    def _forget(self, endpoint: str, entry: _ConsumerGroup) -> None:
        entry.pair.close()
        self._control.forget(endpoint)
        with self._lock:
            if self._groups.get(endpoint) is entry:
                del self._groups[endpoint]

    def _pull_on(self, entry: _ConsumerGroup, endpoint: str, request: pb.PullRequest,
                 sink: PagedKVCache, local_block_ids: list[int], deadline: float,
                 cancelled: threading.Event | None) -> tuple[int, float]:
        stub = self._control.channel(endpoint).unary_stream(
            PULL_COLLECTIVE_METHOD,
            request_serializer=pb.CollectivePullRequest.SerializeToString,
            response_deserializer=pb.CollectiveProgress.FromString,
        )
        call = stub(pb.CollectivePullRequest(pull=request, group_name=entry.name),
                    timeout=max(0.1, deadline - time.monotonic()), metadata=self._metadata)
        try:
            opening = next(call)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION and STALE_GROUP in str(
                err.details()
            ):
                raise _StaleGroup() from err
            raise _Refused(describe_rpc_error(err, endpoint)) from err
        try:
            if not 0 < opening.chunk_bytes <= request.max_chunk_bytes:
                # the staging tensor is sized from this: never from an unchecked peer's word
                raise TransferError(f"producer {endpoint} announced {opening.chunk_bytes} byte "
                                    f"chunks; this consumer asked for at most "
                                    f"{request.max_chunk_bytes}")
            closed: list[pb.CollectiveProgress] = []
            if request.stream_handle:
                plans: Iterable[ChunkPlan] = _announced(call, closed)
            else:
                plans = list(sink.plan_chunks(len(local_block_ids), opening.chunk_bytes))
            staging = self._staging(entry, max(opening.chunk_bytes,
                                               *sink.block_bytes_per_layer))
            aborted = False
            num_bytes = 0
            for plan in plans:
                # An aborted request's chunks are still received (and dropped): leaving the
                # producer mid-send would cost the pair its group and hold the lease until
                # the producer's send times out.
                aborted = aborted or (cancelled is not None and cancelled.is_set())
                if time.monotonic() > deadline:
                    raise TransferError(f"transfer from {endpoint} passed its deadline")
                _check_plan(plan, sink, len(local_block_ids))
                chunk = staging[: plan.num_bytes]
                entry.pair.recv(chunk)
                num_bytes += plan.num_bytes
                if not aborted:
                    blocks = local_block_ids[plan.first_block : plan.first_block + plan.num_blocks]
                    sink.scatter_tensor(plan.layer_index, blocks, chunk)
            closing = closed[0] if closed else next(call, None)
            if aborted and closing is not None and closing.done:
                raise _Refused(f"transfer from {endpoint} cancelled: request aborted")
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.ABORTED:  # a stream failed between chunks
                raise _Refused(describe_rpc_error(err, endpoint)) from err
            raise TransferError(describe_rpc_error(err, endpoint)) from err
        except GroupError as err:
            raise TransferError(f"transfer from {endpoint} failed: {err}") from err
        if closing is None or not closing.done:
            raise TransferError(f"transfer from {endpoint} ended early")
        return num_bytes, closing.producer_wait_us / 1e6

    def _staging(self, entry: _ConsumerGroup, num_bytes: int) -> torch.Tensor:
        if entry.staging is None or entry.staging.numel() < num_bytes:
            device = staging_device(entry.pair.backend, self._cache.device)
            entry.staging = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        return entry.staging


def _announced(call: Iterator[pb.CollectiveProgress],
               closing: list[pb.CollectiveProgress]) -> Iterator[ChunkPlan]:
    """The chunks a stream pull announces; its closing message goes into `closing`."""
    for message in call:
        if message.done:
            closing.append(message)
            return
        yield ChunkPlan(message.layer_index, message.first_block, message.num_blocks,
                        message.num_bytes)


def _check_plan(plan: ChunkPlan, sink: PagedKVCache, num_blocks: int) -> None:
    if (plan.layer_index >= sink.num_layers or plan.num_blocks == 0
            or plan.first_block + plan.num_blocks > num_blocks
            or plan.num_bytes != plan.num_blocks * sink.block_bytes_per_layer[plan.layer_index]):
        raise TransferError(f"malformed chunk announcement: {plan}")


class _StaleGroup(Exception):
    """The producer no longer knows this group: rejoin once."""


class _Refused(Exception):
    """The pull ended with the pair's group in step: the producer refused it before sending
    anything (lease, token, block ids), or an aborted request's chunks were drained."""

