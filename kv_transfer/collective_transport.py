"""NCCL transport (gloo on CPU): control over gRPC, block payload over a pair group.

Lifecycle of one pull (see protos/kv_transfer.proto for the wire):
  1. The consumer looks up its group for the producer's endpoint; if it has none (first pull,
     or the last one failed), it calls JoinGroup: the producer checks backend, tensor-parallel
     size and rank, and per-layer block bytes, refusing any mismatch with a message that says
     which; then both sides build a fresh two-rank group (collective.py) under a new name.
  2. The consumer calls PullCollective (handle, block ids, group name) and holds the group's
     lock until the pull ends: one transfer at a time per pair, so send order pairs with recv
     order without tags.
  3. The producer checks the lease, answers the bytes to come and its chunk size, then sends
     the chunks of `PagedKVCache.plan_chunks` in order; the consumer receives each chunk into
     a staging tensor and scatters it into its paged cache; the producer answers done.
  4. Any failure mid-transfer (peer died, timeout, cancel) closes the group on the side that
     saw it; the other side's next send/recv on it fails within the group timeout, and the
     producer refuses the stale name, so a group is never reused: the next pull rejoins.
  5. Release goes over gRPC, as for the other transports.
Tensor parallelism: both sides must run the same tensor-parallel size (worker i pulls from
worker i); unequal sizes are refused at JoinGroup. The connector itself accepts tp=1 only.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

import grpc
import torch
from torch.distributed import TCPStore

from kv_transfer.collective import (
    CONSUMER_RANK,
    PRODUCER_RANK,
    GroupError,
    PairGroup,
    host_store,
    staging_device,
)
from kv_transfer.grpc_transport import SERVICE, GrpcKVClient, GrpcKVServer, describe_rpc_error
from kv_transfer.kinds import CollectiveBackend
from kv_transfer.paged_kv import ChunkPlan, PagedKVCache
from kv_transfer.streams import PullSource, ReadyChunk, StreamFailed
from kv_transfer.transport import KVBlockClient, PullResult, TransferError
from protos import kv_transfer_pb2 as pb

JOIN_METHOD = f"/{SERVICE}/JoinGroup"
PULL_COLLECTIVE_METHOD = f"/{SERVICE}/PullCollective"
STALE_GROUP = "stale transfer group"


class JoinRefused(Exception):
    """The producer will not pair with this consumer; the message says why."""


@dataclass(frozen=True)
class WorkerIdentity:
    """What a worker tells its peer at JoinGroup."""

    backend: CollectiveBackend
    tp_size: int
    tp_rank: int


@dataclass
class _ProducerGroup:
    name: str
    peer_id: str
    group: Future[PairGroup]
    lock: threading.Lock = field(default_factory=threading.Lock)


class CollectiveSender:
    """Producer side: hosts the rendezvous store, one group per consumer peer, and sends."""

    def __init__(self, cache: PagedKVCache, identity: WorkerIdentity, bind_host: str,
                 timeout_s: float) -> None:
        self._cache = cache
        self._identity = identity
        self._timeout_s = timeout_s
        self._store = host_store(bind_host, timeout_s)
        self._instance = secrets.token_hex(4)  # a restarted producer never repeats a name
        self._generations = itertools.count(1)
        self._groups: dict[str, _ProducerGroup] = {}  # by group name
        self._by_peer: dict[str, str] = {}  # peer id -> its current group name
        self._lock = threading.Lock()
        self._builders = ThreadPoolExecutor(4, thread_name_prefix="kv-group")

    @property
    def num_groups(self) -> int:
        with self._lock:
            return len(self._groups)

    def join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        """Check the consumer, replace its previous group by a new one; raises JoinRefused."""
        self._check_peer(request)
        name = f"{self._instance}/{request.peer_id}/{next(self._generations)}"
        group: Future[PairGroup] = self._builders.submit(
            PairGroup, name, self._identity.backend, PRODUCER_RANK, self._store, self._timeout_s
        )
        with self._lock:
            old = self._by_peer.get(request.peer_id)
            if old is not None:
                self._drop_locked(old)
            self._groups[name] = _ProducerGroup(name, request.peer_id, group)
            self._by_peer[request.peer_id] = name
        return pb.JoinResponse(store_port=self._store.port, group_name=name,
                               timeout_s=self._timeout_s)

    def send(self, group_name: str, source: PullSource, chunk_bytes: int,
             is_active: Callable[[], bool], streamed: bool) -> Iterator[pb.CollectiveProgress]:
        """Send the source's chunks on the named group (the caller owns the source's reader).

        Yields the opening progress message, (streamed: one announcement per chunk,) then
        done. Raises JoinRefused (before yielding) for an unknown, closed or never-built group;
        StreamFailed between chunks (the group stays in step); on a failure mid-chunk the group
        is dropped and the stream ends without done.
        """
        with self._lock:
            entry = self._groups.get(group_name)
        if entry is None:
            raise JoinRefused(f"{STALE_GROUP} {group_name}: rejoin")
        try:
            pair = entry.group.result(self._timeout_s)
        except Exception as err:  # noqa: BLE001 - rendezvous failed or timed out
            self._drop(group_name)
            raise JoinRefused(f"{STALE_GROUP} {group_name}: {err}") from err
        if pair.is_closed:
            self._drop(group_name)
            raise JoinRefused(f"{STALE_GROUP} {group_name}: closed")
        with entry.lock:
            if streamed:
                chunks: Iterable[ReadyChunk] = source.chunks(chunk_bytes, is_active)
                yield pb.CollectiveProgress(num_bytes=0, chunk_bytes=chunk_bytes)
            else:
                chunks = list(source.chunks(chunk_bytes, is_active))
                yield pb.CollectiveProgress(num_bytes=sum(p.num_bytes for p, _ in chunks),
                                            chunk_bytes=chunk_bytes)
            device = staging_device(pair.backend, self._cache.device)
            staging = torch.empty(max(chunk_bytes, *self._cache.block_bytes_per_layer),
                                  dtype=torch.uint8, device=device)
            for plan, blocks in chunks:
                num_bytes = self._cache.gather_tensor(plan.layer_index, blocks, staging)
                if not is_active():
                    self._drop(group_name)
                    return
                if streamed:
                    yield pb.CollectiveProgress(
                        num_bytes=num_bytes, layer_index=plan.layer_index,
                        first_block=plan.first_block, num_blocks=plan.num_blocks,
                    )
                try:
                    pair.send(staging[:num_bytes])
                except GroupError:
                    self._drop(group_name)
                    return
            yield pb.CollectiveProgress(done=True,
                                        producer_wait_us=int(source.waited_s * 1e6))

    def stop(self) -> None:
        with self._lock:
            for name in list(self._groups):
                self._drop_locked(name)
        self._builders.shutdown(wait=False, cancel_futures=True)

    def _check_peer(self, request: pb.JoinRequest) -> None:
        mine = self._identity
        if request.backend != mine.backend:
            raise JoinRefused(f"collective backends differ: producer {mine.backend}, "
                              f"consumer {request.backend}")
        if request.tp_size != mine.tp_size or request.tp_rank != mine.tp_rank:
            raise JoinRefused(
                f"tensor-parallel layouts differ: producer rank {mine.tp_rank} of "
                f"{mine.tp_size}, consumer rank {request.tp_rank} of {request.tp_size}; the "
                "nccl transport pairs worker i with worker i and needs equal sizes"
            )
        if list(request.block_bytes_per_layer) != self._cache.block_bytes_per_layer:
            raise JoinRefused("KV layouts differ (model, block size or dtype): per-layer "
                              f"block bytes {list(request.block_bytes_per_layer)} != "
                              f"{self._cache.block_bytes_per_layer}")

    def _drop(self, name: str) -> None:
        with self._lock:
            self._drop_locked(name)

    def _drop_locked(self, name: str) -> None:
        entry = self._groups.pop(name, None)
        if entry is None:
            return
        if self._by_peer.get(entry.peer_id) == name:
            del self._by_peer[entry.peer_id]
        entry.group.add_done_callback(_close_built)


def _close_built(group: Future[PairGroup]) -> None:
    if not group.cancelled() and group.exception() is None:
        group.result().close()


def collective_handlers(server: GrpcKVServer,
                        sender: CollectiveSender) -> dict[str, grpc.RpcMethodHandler]:
    """The JoinGroup and PullCollective handlers, to add to the producer's gRPC server."""

    def join(request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        server.authorize(context)
        try:
            return sender.join(request)
        except JoinRefused as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
            raise  # unreachable: abort raises

    def pull(request: pb.CollectivePullRequest,
             context: grpc.ServicerContext) -> Iterator[pb.CollectiveProgress]:
        source = server.acquire(request.pull, context)
        try:
            yield from sender.send(request.group_name, source, server.chunk_bytes(request.pull),
                                   context.is_active, streamed=bool(request.pull.stream_handle))
        except JoinRefused as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except StreamFailed as err:
            context.abort(grpc.StatusCode.ABORTED, str(err))
        finally:
            source.finish()

    return {
        "JoinGroup": grpc.unary_unary_rpc_method_handler(
            join, request_deserializer=pb.JoinRequest.FromString,
            response_serializer=pb.JoinResponse.SerializeToString,
        ),
        "PullCollective": grpc.unary_stream_rpc_method_handler(
            pull, request_deserializer=pb.CollectivePullRequest.FromString,
            response_serializer=pb.CollectiveProgress.SerializeToString,
        ),
    }


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
