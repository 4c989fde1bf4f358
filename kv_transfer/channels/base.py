"""Data channels: how a pull's payload moves, behind one small interface.

The control plane (control_server.py, control_client.py) checks token, layout, lease and block
ids, and releases; a data channel only moves checked chunks (chunks.ChunkHeader) from a pull
source on the producer into a sink on the consumer. Three channels exist (registry.py): "grpc"
(a gRPC stream of BlockChunks), "tcp" (a bulk TCP data port, authorized over gRPC) and "nccl"
(a torch.distributed pair group: NCCL, or gloo on CPU).

Producer side, `ProducerChannel` (one per channel a producer serves, owned by its ControlServer):
  - `methods()`: the RPCs the channel adds to the KVTransfer service. Called exactly once,
    before the server starts. A `PullMethod` handler receives a `ServedPull` whose source the
    control plane has already checked and acquired; a `ControlMethod` handler receives its
    request once the token is checked. Either raises `ChannelRefused` to refuse the call.
  - `start(bind_host)`: called exactly once, before the server serves; opens what the channel
    listens on (a data port, a rendezvous store). Default: nothing.
  - `stop()`: called once at shutdown, after the server stopped; frees every connection,
    thread and reader the channel holds. Default: nothing.
Consumer side, `ConsumerChannel` (one per consumer worker, owned by its puller.KVPuller):
  - `receive(...)`: blocking; fills one sink with one part of a pull, reporting the producer's
    end of stream (and wait) through `sink.finish`. Called from many threads at once.
  - `close()`: drops what the channel holds. Idempotent. Default: nothing.
Both sides of a channel are built from the same `(cache, options)`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import grpc

from kv_transfer.kinds import CollectiveBackend
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.sink import ChunkSink
from kv_transfer.streams import PullSource
from protos import kv_transfer_pb2 as pb

if TYPE_CHECKING:
    from kv_transfer.control_client import ControlClient


def remaining_s(deadline: float) -> float:
    """Seconds left until deadline (time.monotonic), at least 0.1: a gRPC call's timeout."""
    return max(0.1, deadline - time.monotonic())


class ChannelRefused(Exception):
    """The channel will not serve this call (answered FAILED_PRECONDITION); says why."""


@dataclass(frozen=True)
class WorkerIdentity:
    """What a worker tells its peer when they pair (collective channel: JoinGroup)."""

    backend: CollectiveBackend
    tp_size: int
    tp_rank: int


@dataclass(frozen=True)
class ChannelOptions:
    """What a channel needs beyond the paged cache (the same on both sides)."""

    identity: WorkerIdentity = field(default_factory=lambda: WorkerIdentity("nccl", 1, 0))
    group_timeout_s: float = 10.0  # collective: longest wait for one send/recv or rendezvous


@dataclass(frozen=True)
class ServedPull:
    """One pull the control plane has checked: the channel sends `source`'s chunks."""

    request: pb.PullRequest  # as the consumer asked for it
    message: Any  # the method's whole request (a PullRequest, or a message wrapping one)
    source: PullSource  # one acquired reader (see PullMethod: who must finish it)
    chunk_bytes: int  # the consumer's chunk size, capped by the producer's
    context: grpc.ServicerContext


def _same_pull(message: Any) -> pb.PullRequest:
    assert isinstance(message, pb.PullRequest), type(message).__name__
    return message


@dataclass(frozen=True)
class PullMethod:
    """An RPC that serves one pull. Streaming: `serve` returns an iterator of responses and the
    control plane finishes the source when it ends. Unary: `serve` returns one response and
    owns the source from the call on (it must finish it, even if it raises)."""

    name: str
    serve: Callable[[ServedPull], Any]
    deserialize: Callable[[bytes], Any]
    serialize: Callable[[Any], bytes]
    streaming: bool = True
    pull_of: Callable[[Any], pb.PullRequest] = _same_pull


@dataclass(frozen=True)
class ControlMethod:
    """A unary RPC of the channel's own (e.g. joining a pair group); token checked first."""

    name: str
    handle: Callable[[Any], Any]
    deserialize: Callable[[bytes], Any]
    serialize: Callable[[Any], bytes]


class ProducerChannel(ABC):
    """Producer side of one data channel."""

    def __init__(self, cache: PagedKVCache, options: ChannelOptions) -> None:
        self.cache = cache
        self.options = options

    @abstractmethod
    def methods(self) -> Sequence[PullMethod | ControlMethod]:
        """The RPCs this channel adds to the service. Called exactly once, before start."""

    def start(self, bind_host: str) -> None:  # noqa: B027 - an optional hook
        """Open what the channel listens on, on bind_host only. Called exactly once."""

    def stop(self) -> None:  # noqa: B027 - an optional hook
        """Free every connection, thread and reader the channel holds. Idempotent."""


class ConsumerChannel(ABC):
    """Consumer side of one data channel. Thread-safe."""

    splits_pulls: ClassVar[bool] = True  # parts of one pull may run on parallel streams

    def __init__(self, cache: PagedKVCache, control: ControlClient,
                 options: ChannelOptions) -> None:
        self.cache = cache
        self.control = control
        self.options = options

    @abstractmethod
    def receive(self, endpoint: str, request: pb.PullRequest, sink: ChunkSink,
                stream_index: int, deadline: float, should_stop: Callable[[], bool]) -> None:
        """Fill `sink` with the chunks of `request` (one part of a pull; its handshake is done)
        and call `sink.finish` at the producer's end of stream. Blocks until then.

        Raises TransferError (or grpc.RpcError / OSError, which the puller describes) on any
        failure or once time.monotonic() passes `deadline`; stops early, raising, once
        should_stop() is true. `stream_index` tells parallel parts apart (their connections).
        """

    def close(self) -> None:  # noqa: B027 - an optional hook
        """Drop connections and state. Idempotent."""
