"""Producer side of the collective transport: the rendezvous store, one pair group per consumer,
and the sends (the lifecycle of a pull is in collective_transport.py).

`collective_handlers` adds JoinGroup and PullCollective to the producer's gRPC server, which
checks the token and the lease for them as for its own calls.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch

from kv_transfer.collective import PRODUCER_RANK, GroupError, PairGroup, host_store, staging_device
from kv_transfer.collective_transport import STALE_GROUP, JoinRefused, WorkerIdentity
from kv_transfer.grpc_server import GrpcKVServer
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.streams import PullSource, ReadyChunk, StreamFailed
from protos import kv_transfer_pb2 as pb


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

