"""Producer side of the gRPC transport: serves one worker's leased blocks.

Lifecycle of one pull, as the producer sees it (the wire is in grpc_transport.py):
  0. First contact: Handshake compares the consumer's protocol version and KV layout hash with
     this producer's (layout.py) and refuses a mismatch, naming both sides' values.
  1. The token interceptor refuses calls without the cluster token before parsing them.
  2. `acquire` checks the block ids and the lease (or the stream of a prompt being prefilled)
     and hands the handler one reader of the blocks.
  3. PullBlocks streams the reader's chunks as BlockChunks; OpenBulk instead issues a ticket
     for the bulk TCP data port (bulk_tcp.py), which sends the same chunks as raw frames.
  4. Release frees the lease's blocks; an unreleased lease expires (leases.py).
The collective transport adds its JoinGroup and PullCollective handlers (`add_handlers`) and
uses `authorize`, `acquire` and `chunk_bytes` for the same checks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from kv_transfer.bulk_tcp import BulkSender
from kv_transfer.chunks import ChunkEncoder
from kv_transfer.grpc_transport import (
    SERVICE,
    WAIT_METADATA_KEY,
    TokenInterceptor,
    has_token,
    message_limit,
    request_limit,
)
from kv_transfer.layout import Hello, KVLayout, mismatch
from kv_transfer.leases import ExpiredHandle, LeaseError, LeaseTable, UnknownHandle
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.streams import LeasePull, PullSource, StreamFailed, StreamTable
from kv_transfer.transport import KVBlockServer
from protos import kv_transfer_pb2 as pb


def _identity(message: bytes) -> bytes:
    return message


class GrpcKVServer(KVBlockServer):
    """Serves one producer worker's leased blocks over gRPC."""

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
        self._bulk: BulkSender | None = None
        self._extra_handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_handlers(self, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """More methods of the KVTransfer service (another transport's control). Before start."""
        assert self._server is None, "add_handlers after start"
        self._extra_handlers.update(handlers)

    def start(self) -> str:
        assert self._server is None, "GrpcKVServer.start called twice"
        limit = message_limit(self._cache, self._max_chunk_bytes)
        server = grpc.server(
            ThreadPoolExecutor(self._max_workers, thread_name_prefix="kv-server"),
            interceptors=(TokenInterceptor(self._token),),
            options=[
                ("grpc.max_send_message_length", limit),
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
            "PullBlocks": grpc.unary_stream_rpc_method_handler(
                self._pull,
                request_deserializer=pb.PullRequest.FromString,
                response_serializer=_identity,
            ),
            "Release": grpc.unary_unary_rpc_method_handler(
                self._release,
                request_deserializer=pb.ReleaseRequest.FromString,
                response_serializer=pb.ReleaseResponse.SerializeToString,
            ),
            "OpenBulk": grpc.unary_unary_rpc_method_handler(
                self._open_bulk,
                request_deserializer=pb.PullRequest.FromString,
                response_serializer=pb.BulkTicket.SerializeToString,
            ),
        }
        handlers.update(self._extra_handlers)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = server.add_insecure_port(self._address)
        if port == 0:
            raise OSError(f"KV server cannot bind {self._address}")
        host = self._address.rsplit(":", 1)[0]
        self._bulk = BulkSender(self._cache, self._leases, host)
        server.start()
        self._server = server
        return f"{host}:{port}"

    def stop(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        if self._bulk is not None:
            self._bulk.stop()
            self._bulk = None

    def authorize(self, context: grpc.ServicerContext) -> None:
        """Abort the call unless it carries the token. The interceptor has already refused
        such calls before parsing them; the handlers check again as defense in depth."""
        if not has_token(context.invocation_metadata(), self._token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")

    def acquire(self, request: pb.PullRequest, context: grpc.ServicerContext) -> PullSource:
        """Check token, block ids and lease (or stream); on success the caller owns one
        reader of the returned source and must `finish` it."""
        self.authorize(context)
        block_ids = list(request.block_ids)
        if len(set(block_ids)) != len(block_ids):
            # Checked before any lease, reader or ticket: a repeated id would make the
            # producer send (and the consumer receive) the same block many times over.
            repeated = sorted(b for b, n in Counter(block_ids).items() if n > 1)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
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
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        except ExpiredHandle as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except (LeaseError, ValueError) as err:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        return LeasePull(self._cache, self._leases, request.handle, block_ids)

    def chunk_bytes(self, request: pb.PullRequest) -> int:
        return min(request.max_chunk_bytes or self._max_chunk_bytes, self._max_chunk_bytes)

    def _pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        source = self.acquire(request, context)
        try:
            encoder = ChunkEncoder(self._cache)
            for plan, blocks in source.chunks(self.chunk_bytes(request), context.is_active):
                if not context.is_active():
                    return
                yield encoder.encode(plan, blocks)
            context.set_trailing_metadata(
                ((WAIT_METADATA_KEY, str(int(source.waited_s * 1e6))),)
            )
        except StreamFailed as err:
            context.abort(grpc.StatusCode.ABORTED, str(err))
        finally:
            source.finish()

    def _open_bulk(self, request: pb.PullRequest, context: grpc.ServicerContext) -> pb.BulkTicket:
        source = self.acquire(request, context)
        assert self._bulk is not None, "server not started"
        ticket = self._bulk.issue(source, self.chunk_bytes(request))
        return pb.BulkTicket(port=self._bulk.port, ticket=ticket)

    def _handshake(self, request: pb.HandshakeRequest,
                   context: grpc.ServicerContext) -> pb.HandshakeResponse:
        self.authorize(context)
        refusal = mismatch(self._hello, Hello.from_wire(request.consumer))
        if refusal:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        return pb.HandshakeResponse(producer=self._hello.to_wire())

    def _release(
        self, request: pb.ReleaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseResponse:
        self.authorize(context)
        return pb.ReleaseResponse(num_blocks_freed=self._leases.release(request.handle))

