"""Consumer side of the "nccl" data channel: one lazily built pair group per producer, control
calls over gRPC (the lifecycle of a pull is in collective.py).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import grpc
import torch
from torch.distributed import TCPStore

from kv_transfer.channels.base import (
    ChannelOptions,
    ConsumerChannel,
    remaining_s,
)
from kv_transfer.channels.collective import JOIN_METHOD, PULL_COLLECTIVE_METHOD, STALE_GROUP
from kv_transfer.channels.pair_group import CONSUMER_RANK, GroupError, PairGroup, staging_device
from kv_transfer.chunks import ChunkHeader, from_progress
from kv_transfer.control import describe_rpc_error
from kv_transfer.control_client import ControlClient
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.sink import ChunkSink
from kv_transfer.transport import TransferError
from protos import kv_transfer_pb2 as pb


@dataclass
class _ConsumerGroup:
    name: str
    pair: PairGroup
    lock: threading.Lock = field(default_factory=threading.Lock)
    staging: torch.Tensor | None = None


class CollectiveConsumer(ConsumerChannel):
    """Receives over a lazily built group per producer endpoint; control calls (JoinGroup,
    PullCollective) go over the control plane's connection. One transfer at a time per group,
    so a pull is never split into parallel parts."""

    splits_pulls = False

    def __init__(self, cache: PagedKVCache, control: ControlClient,
                 options: ChannelOptions) -> None:
        super().__init__(cache, control, options)
        self._peer_id = secrets.token_hex(8)  # a restarted consumer is a new peer
        self._groups: dict[str, _ConsumerGroup] = {}  # by producer endpoint
        self._lock = threading.Lock()
        self.num_joins = 0

    def receive(self, endpoint: str, request: pb.PullRequest, sink: ChunkSink,
                stream_index: int, deadline: float, should_stop: Callable[[], bool]) -> None:
        for attempt in range(2):
            entry = self._group(endpoint, deadline)
            try:
                with entry.lock:
                    self._receive_on(entry, endpoint, request, sink, deadline, should_stop)
                return
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

    def close(self) -> None:
        with self._lock:
            groups, self._groups = list(self._groups.values()), {}
        for entry in groups:
            entry.pair.close()

    @property
    def num_groups(self) -> int:
        with self._lock:
            return len(self._groups)

    @property
    def group_names(self) -> list[str]:
        with self._lock:
            return [entry.name for entry in self._groups.values()]

    def _group(self, endpoint: str, deadline: float) -> _ConsumerGroup:
        with self._lock:
            entry = self._groups.get(endpoint)
        if entry is not None and not entry.pair.is_closed:
            return entry
        join = self.control.unary(endpoint, JOIN_METHOD, pb.JoinResponse.FromString)
        identity = self.options.identity
        hello = pb.JoinRequest(
            peer_id=self._peer_id, backend=identity.backend, tp_size=identity.tp_size,
            tp_rank=identity.tp_rank, block_bytes_per_layer=self.cache.block_bytes_per_layer,
        )
        try:
            answer = join(hello, timeout=remaining_s(deadline), metadata=self.control.metadata)
        except grpc.RpcError as err:
            raise TransferError(describe_rpc_error(err, endpoint)) from err
        host = endpoint.rsplit(":", 1)[0]
        try:
            store = TCPStore(host, answer.store_port, is_master=False,
                             timeout=timedelta(seconds=answer.timeout_s))
            pair = PairGroup(answer.group_name, identity.backend, CONSUMER_RANK, store,
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
        with self._lock:
            if self._groups.get(endpoint) is entry:
                del self._groups[endpoint]

    def _receive_on(self, entry: _ConsumerGroup, endpoint: str, request: pb.PullRequest,
                    sink: ChunkSink, deadline: float, should_stop: Callable[[], bool]) -> None:
        pull_collective = self.control.stream(endpoint, PULL_COLLECTIVE_METHOD,
                                              pb.CollectiveProgress.FromString)
        call = pull_collective(pb.CollectivePullRequest(pull=request, group_name=entry.name),
                    timeout=remaining_s(deadline), metadata=self.control.metadata)
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
                headers: Iterable[ChunkHeader] = _announced(call, closed)
            else:
                headers = list(sink.cache.plan_chunks(sink.num_blocks, opening.chunk_bytes))
            staging = self._staging(entry, max(opening.chunk_bytes, *sink.block_bytes_per_layer))
            aborted = False
            for header in headers:
                # An aborted request's chunks are still received (and dropped): leaving the
                # producer mid-send would cost the pair its group and hold the lease until
                # the producer's send times out.
                aborted = aborted or should_stop()
                if time.monotonic() > deadline:
                    raise TransferError(f"transfer from {endpoint} passed its deadline")
                sink.check(header, staging.numel(), wire="chunk announcement")
                chunk = staging[: header.num_bytes]
                entry.pair.recv(chunk)
                if not aborted:
                    sink.write(header, chunk)
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
        sink.finish(closing.producer_wait_us / 1e6)

    def _staging(self, entry: _ConsumerGroup, num_bytes: int) -> torch.Tensor:
        if entry.staging is None or entry.staging.numel() < num_bytes:
            device = staging_device(entry.pair.backend, self.cache.device)
            entry.staging = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        return entry.staging


def _announced(call: Iterator[pb.CollectiveProgress],
               closing: list[pb.CollectiveProgress]) -> Iterator[ChunkHeader]:
    """The chunks a stream pull announces; its closing message goes into `closing`."""
    for message in call:
        if message.done:
            closing.append(message)
            return
        yield from_progress(message)


class _StaleGroup(Exception):
    """The producer no longer knows this group: rejoin once."""


class _Refused(Exception):
    """The pull ended with the pair's group in step: the producer refused it before sending
    anything (lease, token, block ids), or an aborted request's chunks were drained."""
