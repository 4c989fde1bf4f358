"""Producer side of the control plane: one gRPC server per producer worker, serving its leased
blocks through every data channel it runs.

Lifecycle of one pull, as the producer sees it (the wire is in control.py):
  0. First contact: Handshake compares the consumer's protocol version and KV layout hash with
     this producer's (layout.py) and refuses a mismatch, naming both sides' values.
  1. The token interceptor refuses calls without the cluster token before parsing them.
  2. A channel's pull method (PullBlocks, OpenBulk, PullCollective) reaches the channel only
     after `_open` checked the block ids and the lease (or the stream of a prompt being
     prefilled) and acquired one reader of the blocks: the same checks, in one place, for
     every channel.
  3. The channel sends the reader's chunks (channels/); refusals and failed streams map to
     the same status codes for every channel.
  4. Release frees the lease's blocks; an unreleased lease expires (leases.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import grpc

from kv_transfer.channels.base import (
    ChannelOptions,
    ChannelRefused,
    ControlMethod,
    ProducerChannel,
    PullMethod,
    ServedPull,
)
from kv_transfer.channels.registry import CHANNELS
from kv_transfer.control import (
    SERVICE,
    TokenInterceptor,
    has_token,
    message_limit,
    request_limit,
)
from kv_transfer.kinds import ChannelName
from kv_transfer.layout import Hello, KVLayout, mismatch
from kv_transfer.leases import ExpiredHandle, LeaseError, LeaseTable, UnknownHandle
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.streams import LeasePull, PullSource, StreamFailed, StreamTable
from protos import kv_transfer_pb2 as pb

# Every channel a producer can serve without a GPU-only backend (a consumer of either may pull).
DEFAULT_CHANNELS: tuple[ChannelName, ...] = ("grpc", "tcp")


def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


class ControlServer:
    """Serves one producer worker's leased (or streamed) blocks over its data channels."""

    def __init__(
        self,
        cache: PagedKVCache,
        leases: LeaseTable,
        *,
        bind_host: str,
        port: int,
        auth_token: str,
        max_chunk_bytes: int,
        handle_wait_s: float,
        channels: Sequence[ChannelName] = DEFAULT_CHANNELS,
        options: ChannelOptions | None = None,
        max_workers: int = 32,
        streams: StreamTable | None = None,
        stream_wait_s: float = 30.0,
        layout: KVLayout | None = None,
    ) -> None:
        self._cache = cache
        self._hello = Hello.mine(layout or KVLayout.of_cache(cache))
        self._leases = leases
        self._address = f"{bind_host}:{port}"
        self._token = auth_token.encode()
        self._max_chunk_bytes = max_chunk_bytes
        self._handle_wait_s = handle_wait_s
        self._streams = streams
        self._stream_wait_s = stream_wait_s
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        channel_options = options or ChannelOptions()
        self._channels: dict[ChannelName, ProducerChannel] = {
            name: CHANNELS[name].producer(cache, channel_options) for name in channels
        }

    @property
    def channels(self) -> Mapping[ChannelName, ProducerChannel]:
        """The data channels this producer serves, by name."""
        return self._channels

    def start(self) -> str:
        """Begin serving; returns the endpoint consumers dial. Called exactly once."""
        assert self._server is None, "ControlServer.start called twice"
        self._executor = ThreadPoolExecutor(self._max_workers, thread_name_prefix="kv-server")
        server = grpc.server(
            self._executor,
            interceptors=(TokenInterceptor(self._token),),
            options=[
                ("grpc.max_send_message_length", message_limit(self._cache,
                                                               self._max_chunk_bytes)),
                ("grpc.max_receive_message_length", request_limit(self._cache)),
                ("grpc.so_reuseport", 0),
            ],
        )
        handlers = {
            "Handshake": grpc.unary_unary_rpc_method_handler(
                self._handshake,
                request_deserializer=pb.HandshakeRequest.FromString,
                response_serializer=pb.HandshakeResponse.SerializeToString,
            ),
            "Release": grpc.unary_unary_rpc_method_handler(
                self._release,
                request_deserializer=pb.ReleaseRequest.FromString,
                response_serializer=pb.ReleaseResponse.SerializeToString,
            ),
        }
        for channel in self._channels.values():
            for method in channel.methods():
                assert method.name not in handlers, f"two handlers for {method.name}"
                handlers[method.name] = self._handler(method)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = server.add_insecure_port(self._address)
        if port == 0:
            raise OSError(f"KV server cannot bind {self._address}")
        host = self._address.rsplit(":", 1)[0]
        for channel in self._channels.values():
            channel.start(host)
        server.start()
        self._server = server
        return f"{host}:{port}"

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving; in-flight pulls are cut after grace_s. Idempotent."""
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
            for channel in self._channels.values():
                channel.stop()
        if self._executor is not None:
            # handlers still running see their calls cancelled and end (a collective send
            # within its group timeout); their threads are joined here
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    # One wrapper per kind of method: the checks every channel shares

    def _handler(self, method: PullMethod | ControlMethod) -> grpc.RpcMethodHandler:
        if isinstance(method, ControlMethod):
            return grpc.unary_unary_rpc_method_handler(
                lambda message, context: self._control(method, message, context),
                request_deserializer=method.deserialize, response_serializer=method.serialize,
            )
        if method.streaming:
            return grpc.unary_stream_rpc_method_handler(
                lambda message, context: self._pull_stream(method, message, context),
                request_deserializer=method.deserialize, response_serializer=method.serialize,
            )
        return grpc.unary_unary_rpc_method_handler(
            lambda message, context: self._pull_unary(method, message, context),
            request_deserializer=method.deserialize, response_serializer=method.serialize,
        )

    def _control(self, method: ControlMethod, message: Any,
                 context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        try:
            return method.handle(message)
        except ChannelRefused as err:
            _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(err))

    def _pull_unary(self, method: PullMethod, message: Any,
                    context: grpc.ServicerContext) -> Any:
        pull = self._open(method, message, context)
        try:
            return method.serve(pull)  # owns the source now
        except ChannelRefused as err:
            _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(err))

    def _pull_stream(self, method: PullMethod, message: Any,
                     context: grpc.ServicerContext) -> Iterator[Any]:
        pull = self._open(method, message, context)
        try:
            yield from method.serve(pull)
        except ChannelRefused as err:
            _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except StreamFailed as err:
            _refuse(context, grpc.StatusCode.ABORTED, str(err))
        finally:
            pull.source.finish()

    def _authorize(self, context: grpc.ServicerContext) -> None:
        """Abort the call unless it carries the token. The interceptor has already refused
        such calls before parsing them; the handlers check again as defense in depth."""
        if not has_token(context.invocation_metadata(), self._token):
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")

    def _open(self, method: PullMethod, message: Any,
              context: grpc.ServicerContext) -> ServedPull:
        """Check token, block ids and lease (or stream); on success the pull holds one reader
        of its source."""
        self._authorize(context)
        request = method.pull_of(message)
        chunk_bytes = min(request.max_chunk_bytes or self._max_chunk_bytes,
                          self._max_chunk_bytes)
        source = self._acquire(request, context)
        return ServedPull(request, message, source, chunk_bytes, context)

    def _acquire(self, request: pb.PullRequest, context: grpc.ServicerContext) -> PullSource:
        block_ids = list(request.block_ids)
        if len(set(block_ids)) != len(block_ids):
            # Checked before any lease, reader or ticket: a repeated id would make the
            # producer send (and the consumer receive) the same block many times over.
            repeated = sorted(b for b, n in Counter(block_ids).items() if n > 1)
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                    f"duplicate block ids in the request: {repeated[:8]}")
        try:
            if request.stream_handle:
                if self._streams is None:
                    raise LeaseError("this producer does not serve overlapped (stream) pulls")
                return self._streams.open_reader(request.stream_handle, block_ids,
                                                 self._stream_wait_s, self._stream_wait_s)
            self._cache.check_block_ids(block_ids)
            self._leases.acquire(request.handle, block_ids, self._handle_wait_s)
        except UnknownHandle as err:
            _refuse(context, grpc.StatusCode.NOT_FOUND, str(err))
        except ExpiredHandle as err:
            _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except (LeaseError, ValueError) as err:
            _refuse(context, grpc.StatusCode.PERMISSION_DENIED, str(err))
        return LeasePull(self._cache, self._leases, request.handle, block_ids)

    def _handshake(self, request: pb.HandshakeRequest,
                   context: grpc.ServicerContext) -> pb.HandshakeResponse:
        self._authorize(context)
        refusal = mismatch(self._hello, Hello.from_wire(request.consumer))
        if refusal:
            _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, refusal)
        return pb.HandshakeResponse(producer=self._hello.to_wire())

    def _release(self, request: pb.ReleaseRequest,
                 context: grpc.ServicerContext) -> pb.ReleaseResponse:
        self._authorize(context)
        return pb.ReleaseResponse(num_blocks_freed=self._leases.release(request.handle))
