"""Producer side of the "nccl" data channel: the rendezvous store, one pair group per
consumer, and the sends (the lifecycle of a pull is in collective.py).
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch.distributed import TCPStore

from kv_transfer.channels.base import (
    ChannelOptions,
    ChannelRefused,
    ControlMethod,
    ProducerChannel,
    PullMethod,
    ServedPull,
)
from kv_transfer.channels.collective import STALE_GROUP
from kv_transfer.channels.pair_group import (
    PRODUCER_RANK,
    GroupError,
    PairGroup,
    host_store,
    staging_device,
)
from kv_transfer.chunks import closing_progress, to_progress
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.streams import PullSource, ReadyChunk
from protos import kv_transfer_pb2 as pb


@dataclass
class _ProducerGroup:
    name: str
    peer_id: str
    group: Future[PairGroup]
    lock: threading.Lock = field(default_factory=threading.Lock)


class CollectiveProducer(ProducerChannel):
    """Serves JoinGroup and PullCollective: hosts the rendezvous store (from start on), one
    group per consumer peer, and sends."""

    def __init__(self, cache: PagedKVCache, options: ChannelOptions) -> None:
        super().__init__(cache, options)
        self._timeout_s = options.group_timeout_s
        self._store: TCPStore | None = None
        self._instance = secrets.token_hex(4)  # a restarted producer never repeats a name
        self._generations = itertools.count(1)
        self._groups: dict[str, _ProducerGroup] = {}  # by group name
        self._by_peer: dict[str, str] = {}  # peer id -> its current group name
        self._lock = threading.Lock()
        self._builders = ThreadPoolExecutor(4, thread_name_prefix="kv-group")

    def methods(self) -> Sequence[PullMethod | ControlMethod]:
        return [
            ControlMethod("JoinGroup", self.join, pb.JoinRequest.FromString,
                          pb.JoinResponse.SerializeToString),
            PullMethod("PullCollective", self._serve, pb.CollectivePullRequest.FromString,
                       pb.CollectiveProgress.SerializeToString, pull_of=_pull_of),
        ]

    def start(self, bind_host: str) -> None:
        self._store = host_store(bind_host, self._timeout_s)

    @property
    def num_groups(self) -> int:
        with self._lock:
            return len(self._groups)

    def join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        """Check the consumer, replace its previous group by a new one; raises
        ChannelRefused."""
        self._check_peer(request)
        store = self._store
        if store is None:
            raise ChannelRefused("the producer's rendezvous store is closed")
        name = f"{self._instance}/{request.peer_id}/{next(self._generations)}"
        group: Future[PairGroup] = self._builders.submit(
            PairGroup, name, self.options.identity.backend, PRODUCER_RANK, store,
            self._timeout_s,
        )
        with self._lock:
            old = self._by_peer.get(request.peer_id)
            if old is not None:
                self._drop_locked(old)
            self._groups[name] = _ProducerGroup(name, request.peer_id, group)
            self._by_peer[request.peer_id] = name
        return pb.JoinResponse(store_port=store.port, group_name=name,
                               timeout_s=self._timeout_s)

    def _serve(self, pull: ServedPull) -> Iterator[pb.CollectiveProgress]:
        return self.send(pull.message.group_name, pull.source, pull.chunk_bytes,
                         pull.context.is_active, streamed=bool(pull.request.stream_handle))

    def send(self, group_name: str, source: PullSource, chunk_bytes: int,
             is_active: Callable[[], bool], streamed: bool) -> Iterator[pb.CollectiveProgress]:
        """Send the source's chunks on the named group (the caller owns the source's reader).

        Yields the opening progress message, (streamed: one announcement per chunk,) then
        done. Raises ChannelRefused (before yielding) for an unknown, closed or never-built
        group; StreamFailed between chunks (the group stays in step); on a failure mid-chunk
        the group is dropped and the stream ends without done.
        """
        with self._lock:
            entry = self._groups.get(group_name)
        if entry is None:
            raise ChannelRefused(f"{STALE_GROUP} {group_name}: rejoin")
        try:
            pair = entry.group.result(self._timeout_s)
        except Exception as err:  # noqa: BLE001 - rendezvous failed or timed out
            self._drop(group_name)
            raise ChannelRefused(f"{STALE_GROUP} {group_name}: {err}") from err
        if pair.is_closed:
            self._drop(group_name)
            raise ChannelRefused(f"{STALE_GROUP} {group_name}: closed")
        with entry.lock:
            if streamed:
                chunks: Iterable[ReadyChunk] = source.chunks(chunk_bytes, is_active)
                yield pb.CollectiveProgress(num_bytes=0, chunk_bytes=chunk_bytes)
            else:
                chunks = list(source.chunks(chunk_bytes, is_active))
                yield pb.CollectiveProgress(num_bytes=sum(h.num_bytes for h, _ in chunks),
                                            chunk_bytes=chunk_bytes)
            device = staging_device(pair.backend, self.cache.device)
            staging = torch.empty(max(chunk_bytes, *self.cache.block_bytes_per_layer),
                                  dtype=torch.uint8, device=device)
            for header, blocks in chunks:
                num_bytes = self.cache.gather_tensor(header.layer_index, blocks, staging)
                if not is_active():
                    self._drop(group_name)
                    return
                if streamed:
                    yield to_progress(header)
                try:
                    pair.send(staging[:num_bytes])
                except GroupError:
                    self._drop(group_name)
                    return
            yield closing_progress(source.waited_s)

    def stop(self) -> None:
        with self._lock:
            for name in list(self._groups):
                self._drop_locked(name)
        # a rendezvous still waiting for its consumer ends within the group timeout
        self._builders.shutdown(wait=True, cancel_futures=True)
        self._store = None

    def _check_peer(self, request: pb.JoinRequest) -> None:
        mine = self.options.identity
        if request.backend != mine.backend:
            raise ChannelRefused(f"collective backends differ: producer {mine.backend}, "
                                 f"consumer {request.backend}")
        if request.tp_size != mine.tp_size or request.tp_rank != mine.tp_rank:
            raise ChannelRefused(
                f"tensor-parallel layouts differ: producer rank {mine.tp_rank} of "
                f"{mine.tp_size}, consumer rank {request.tp_rank} of {request.tp_size}; the "
                "nccl transport pairs worker i with worker i and needs equal sizes"
            )
        if list(request.block_bytes_per_layer) != self.cache.block_bytes_per_layer:
            raise ChannelRefused("KV layouts differ (model, block size or dtype): per-layer "
                                 f"block bytes {list(request.block_bytes_per_layer)} != "
                                 f"{self.cache.block_bytes_per_layer}")

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


def _pull_of(message: pb.CollectivePullRequest) -> pb.PullRequest:
    return message.pull
