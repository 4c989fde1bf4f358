"""gRPC transport: the producer's worker serves leased blocks, the consumer streams them in.

1. The consumer sends PullRequest(handle, block ids, max chunk bytes).
2. The producer checks the shared token and the lease, then streams BlockChunks layer by layer;
   each chunk's payload is gathered straight from the paged KV tensor into the outgoing message
   buffer (the protobuf encoding is written by hand around it: one gather copy, no re-encode).
3. The consumer scatters each chunk into its own paged KV tensor as it arrives, so memory stays
   bounded by one chunk per stream for any prompt length, then checks every block arrived.
4. The consumer calls Release; the producer frees the blocks.
"""

from __future__ import annotations

import contextlib
import hmac
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from kv_transfer.leases import ExpiredHandle, LeaseError, LeaseTable, UnknownHandle
from kv_transfer.paged_kv import ChunkPlan, PagedKVCache
from kv_transfer.params import TransferParams
from kv_transfer.transport import KVBlockClient, KVBlockServer, PullResult, TransferError
from protos import kv_transfer_pb2 as pb

SERVICE = "disagg.kv.KVTransfer"
PULL_METHOD = f"/{SERVICE}/PullBlocks"
RELEASE_METHOD = f"/{SERVICE}/Release"
TOKEN_METADATA_KEY = "x-disagg-token"
_PAYLOAD_TAG = bytes([(4 << 3) | 2])  # BlockChunk.payload: field 4, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _identity(message: bytes) -> bytes:
    return message


def encode_chunk(cache: PagedKVCache, block_ids: list[int], plan: ChunkPlan) -> bytes:
    """A serialized BlockChunk whose payload is gathered in place from the cache."""
    header = pb.BlockChunk(
        layer_index=plan.layer_index, first_block=plan.first_block, num_blocks=plan.num_blocks
    ).SerializeToString()
    prefix = header + _PAYLOAD_TAG + _varint(plan.num_bytes)
    buf = bytearray(len(prefix) + plan.num_bytes)
    buf[: len(prefix)] = prefix
    blocks = block_ids[plan.first_block : plan.first_block + plan.num_blocks]
    cache.gather_into(plan.layer_index, blocks, memoryview(buf)[len(prefix) :])
    return bytes(buf)


def _message_limit(cache: PagedKVCache, max_chunk_bytes: int) -> int:
    return max(max_chunk_bytes, max(cache.block_bytes_per_layer)) + 4096


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
        max_workers: int = 8,
    ) -> None:
        self._cache = cache
        self._leases = leases
        self._address = f"{bind_host}:{port}"
        self._token = auth_token.encode()
        self._max_chunk_bytes = max_chunk_bytes
        self._handle_wait_s = handle_wait_s
        self._max_workers = max_workers
        self._server: grpc.Server | None = None

    def start(self) -> str:
        assert self._server is None, "GrpcKVServer.start called twice"
        limit = _message_limit(self._cache, self._max_chunk_bytes)
        server = grpc.server(
            ThreadPoolExecutor(self._max_workers, thread_name_prefix="kv-server"),
            options=[("grpc.max_send_message_length", limit), ("grpc.so_reuseport", 0)],
        )
        handlers = {
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
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = server.add_insecure_port(self._address)
        if port == 0:
            raise OSError(f"KV server cannot bind {self._address}")
        server.start()
        self._server = server
        host = self._address.rsplit(":", 1)[0]
        return f"{host}:{port}"

    def stop(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None

    def _authorize(self, context: grpc.ServicerContext) -> None:
        for key, value in context.invocation_metadata():
            if key == TOKEN_METADATA_KEY and hmac.compare_digest(str(value).encode(), self._token):
                return
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")

    def _pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._authorize(context)
        block_ids = list(request.block_ids)
        try:
            self._cache.check_block_ids(block_ids)
            self._leases.acquire(request.handle, block_ids, self._handle_wait_s)
        except UnknownHandle as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        except ExpiredHandle as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except (LeaseError, ValueError) as err:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        try:
            chunk_bytes = min(request.max_chunk_bytes or self._max_chunk_bytes,
                              self._max_chunk_bytes)
            for plan in self._cache.plan_chunks(len(block_ids), chunk_bytes):
                if not context.is_active():
                    return
                yield encode_chunk(self._cache, block_ids, plan)
        finally:
            self._leases.finish_pull(request.handle)

    def _release(
        self, request: pb.ReleaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseResponse:
        self._authorize(context)
        return pb.ReleaseResponse(num_blocks_freed=self._leases.release(request.handle))


def describe_rpc_error(err: grpc.RpcError, endpoint: str) -> str:
    code = err.code() if hasattr(err, "code") else None
    detail = err.details() if hasattr(err, "details") else str(err)
    reasons = {
        grpc.StatusCode.UNAVAILABLE: f"producer {endpoint} unreachable",
        grpc.StatusCode.DEADLINE_EXCEEDED: f"transfer from {endpoint} passed its deadline",
        grpc.StatusCode.NOT_FOUND: f"producer {endpoint} does not know the transfer handle",
        grpc.StatusCode.FAILED_PRECONDITION: f"transfer handle at {endpoint} no longer valid",
        grpc.StatusCode.UNAUTHENTICATED: f"producer {endpoint} rejected the cluster token",
        grpc.StatusCode.PERMISSION_DENIED: f"producer {endpoint} refused the block list",
        grpc.StatusCode.CANCELLED: f"transfer from {endpoint} cancelled",
    }
    reason = reasons.get(code, f"transfer from {endpoint} failed ({code})")
    return f"{reason}: {detail}"


class GrpcKVClient(KVBlockClient):
    """Pulls blocks into one consumer worker's paged KV cache over gRPC."""

    def __init__(self, cache: PagedKVCache, *, auth_token: str, max_chunk_bytes: int) -> None:
        self._cache = cache
        self._metadata = ((TOKEN_METADATA_KEY, auth_token),)
        self._max_chunk_bytes = max_chunk_bytes
        self._limit = _message_limit(cache, max_chunk_bytes)
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def pull(
        self,
        endpoint: str,
        handle: str,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        timeout_s: float,
        cancelled: threading.Event | None = None,
    ) -> PullResult:
        assert len(remote_block_ids) == len(local_block_ids), "remote/local block count differs"
        self._cache.check_block_ids(local_block_ids)
        start = time.perf_counter()
        stub = self._channel(endpoint).unary_stream(
            PULL_METHOD,
            request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=pb.BlockChunk.FromString,
        )
        request = pb.PullRequest(
            handle=handle, block_ids=remote_block_ids, max_chunk_bytes=self._max_chunk_bytes
        )
        received = [bytearray(len(local_block_ids)) for _ in range(self._cache.num_layers)]
        num_bytes = 0
        call = stub(request, timeout=timeout_s, metadata=self._metadata)
        try:
            for chunk in call:
                if cancelled is not None and cancelled.is_set():
                    call.cancel()
                    raise TransferError(f"transfer from {endpoint} cancelled: request aborted")
                num_bytes += self._store_chunk(chunk, local_block_ids, received)
        except grpc.RpcError as err:
            raise TransferError(describe_rpc_error(err, endpoint)) from err
        missing = sum(row.count(0) for row in received)
        if missing:
            total = len(local_block_ids) * self._cache.num_layers
            raise TransferError(
                f"transfer from {endpoint} ended early: {total - missing} of {total} "
                "layer-blocks arrived"
            )
        elapsed_ms = (time.perf_counter() - start) * 1e3
        return PullResult(len(local_block_ids), num_bytes, elapsed_ms)

    def _store_chunk(
        self, chunk: pb.BlockChunk, local_block_ids: list[int], received: list[bytearray]
    ) -> int:
        layer, first, count = chunk.layer_index, chunk.first_block, chunk.num_blocks
        if layer >= self._cache.num_layers or count == 0 or first + count > len(local_block_ids):
            raise TransferError(f"malformed chunk: layer {layer}, blocks {first}+{count}")
        expected = count * self._cache.block_bytes_per_layer[layer]
        if len(chunk.payload) != expected:
            raise TransferError(
                f"chunk size {len(chunk.payload)} != {expected}: producer and consumer KV "
                "layouts differ (model, block size or dtype)"
            )
        self._cache.scatter_from(layer, local_block_ids[first : first + count], chunk.payload)
        received[layer][first : first + count] = b"\x01" * count
        return expected

    def release(self, endpoint: str, handle: str, timeout_s: float) -> None:
        stub = self._channel(endpoint).unary_unary(
            RELEASE_METHOD,
            request_serializer=pb.ReleaseRequest.SerializeToString,
            response_deserializer=pb.ReleaseResponse.FromString,
        )
        # On failure the producer's lease expiry frees the blocks.
        with contextlib.suppress(grpc.RpcError):
            stub(pb.ReleaseRequest(handle=handle), timeout=timeout_s, metadata=self._metadata)

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()

    def _channel(self, endpoint: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(endpoint)
            if channel is None:
                channel = grpc.insecure_channel(
                    endpoint, options=[("grpc.max_receive_message_length", self._limit)]
                )
                self._channels[endpoint] = channel
            return channel


def release_handle(transfer: TransferParams, auth_token: str, timeout_s: float = 2.0) -> None:
    """Free a published handle that no consumer will pull (best effort)."""
    with grpc.insecure_channel(transfer.endpoint) as channel:
        stub = channel.unary_unary(
            RELEASE_METHOD,
            request_serializer=pb.ReleaseRequest.SerializeToString,
            response_deserializer=pb.ReleaseResponse.FromString,
        )
        with contextlib.suppress(grpc.RpcError):  # the lease expires instead
            stub(pb.ReleaseRequest(handle=transfer.handle), timeout=timeout_s,
                 metadata=((TOKEN_METADATA_KEY, auth_token),))
