"""gRPC transport: the producer's worker serves leased blocks, the consumer streams them in.

0. First contact (once per producer): the consumer's Handshake states its protocol version and
   KV layout (layout.py); the producer refuses a mismatch, naming both sides' values.
1. The consumer sends PullRequest(handle, block ids, max chunk bytes).
2. The producer checks the shared token and the lease, then streams BlockChunks layer by layer;
   each chunk's payload is gathered from the paged KV tensor behind a hand-written protobuf
   header (no protobuf re-encode of the payload).
3. The consumer parses each chunk in place and scatters its payload into its own paged KV
   tensor as it arrives, so memory stays bounded by one chunk per stream for any prompt
   length, then checks every block arrived.
4. The consumer calls Release; the producer frees the blocks.
Every call is checked for the shared token (call metadata) by an interceptor before its request
is parsed, and the server accepts only control-sized requests (`request_limit`): the payload
only ever flows from producer to consumer.

This module holds what both sides share (the service's method names, the token check, the
message limits, error descriptions, Release); the producer side is `grpc_server.GrpcKVServer`,
the consumer side `grpc_client.GrpcKVClient`. The other transports (bulk TCP, collective) use
the same service for their control calls.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Callable, Iterable

import grpc

from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.params import TransferParams
from protos import kv_transfer_pb2 as pb

SERVICE = "disagg.kv.KVTransfer"
HANDSHAKE_METHOD = f"/{SERVICE}/Handshake"
PULL_METHOD = f"/{SERVICE}/PullBlocks"
RELEASE_METHOD = f"/{SERVICE}/Release"
OPEN_BULK_METHOD = f"/{SERVICE}/OpenBulk"
JOIN_METHOD = f"/{SERVICE}/JoinGroup"
PULL_COLLECTIVE_METHOD = f"/{SERVICE}/PullCollective"
TOKEN_METADATA_KEY = "x-disagg-token"
WAIT_METADATA_KEY = "x-disagg-wait-us"


def message_limit(cache: PagedKVCache, max_chunk_bytes: int) -> int:
    """Largest message the producer sends: one chunk (at least one block) and its header."""
    return max(max_chunk_bytes, max(cache.block_bytes_per_layer)) + 4096


def request_limit(cache: PagedKVCache) -> int:
    """Largest control request the producer accepts: a block id list as long as its cache (a
    varint of at most 5 bytes each, plus tag) and room for handles and names."""
    return 6 * cache.num_blocks + (64 << 10)


def has_token(metadata: Iterable[tuple[str, str | bytes]], token: bytes) -> bool:
    for key, value in metadata:
        raw = value if isinstance(value, bytes) else value.encode()
        if key == TOKEN_METADATA_KEY and hmac.compare_digest(raw, token):
            return True
    return False


def _reject_unauthenticated(request: bytes, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without the cluster token before their request is deserialized: the
    rejecting handler takes the raw bytes and never parses them."""

    def __init__(self, token: bytes) -> None:
        self._token = token
        self._reject = grpc.unary_unary_rpc_method_handler(_reject_unauthenticated)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        metadata = handler_call_details.invocation_metadata
        if has_token(metadata or (), self._token):
            return continuation(handler_call_details)
        return self._reject


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
        grpc.StatusCode.INVALID_ARGUMENT: f"producer {endpoint} refused a malformed request",
        grpc.StatusCode.RESOURCE_EXHAUSTED: f"producer {endpoint} refused an oversize message",
        grpc.StatusCode.CANCELLED: f"transfer from {endpoint} cancelled",
    }
    reason = reasons.get(code, f"transfer from {endpoint} failed ({code})")
    return f"{reason}: {detail}"


def release_handle(transfer: TransferParams, auth_token: str, timeout_s: float = 2.0) -> None:
    """Free a published handle that no consumer will pull (best effort)."""
    with grpc.insecure_channel(transfer.endpoint) as channel:
        send_release(channel, transfer.handle, ((TOKEN_METADATA_KEY, auth_token),), timeout_s)


def send_release(channel: grpc.Channel, handle: str, metadata: tuple[tuple[str, str], ...],
                 timeout_s: float) -> None:
    stub = channel.unary_unary(
        RELEASE_METHOD,
        request_serializer=pb.ReleaseRequest.SerializeToString,
        response_deserializer=pb.ReleaseResponse.FromString,
    )
    # On failure the producer's lease expiry frees the blocks.
    with contextlib.suppress(grpc.RpcError):
        stub(pb.ReleaseRequest(handle=handle), timeout=timeout_s, metadata=metadata)
