"""The control plane's wire: one gRPC service, `disagg.kv.KVTransfer`, for every data channel.

Lifecycle of one transfer, as the control plane sees it:
  0. First contact (once per producer): the consumer's Handshake states its protocol version and
     KV layout hash (layout.py); the producer refuses a mismatch, naming both sides' values.
  1. Every call carries the cluster token (call metadata); an interceptor refuses calls without
     it before their request is parsed, and the server accepts only control-sized requests
     (`request_limit`): the payload only ever flows from producer to consumer.
  2. A pull names a lease (or the stream of a prompt being prefilled) and its block ids; the
     producer checks them once, for every channel, then hands the channel one reader of the
     blocks (control_server.py). The channel moves the payload (channels/).
  3. Release frees the lease's blocks; an unreleased lease expires (leases.py).

This module holds what both sides share: method names, the token check, message limits and
error descriptions. The producer side is `control_server.ControlServer`, the consumer side
`control_client.ControlClient`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable

import grpc

from kv_transfer.paged_kv import PagedKVCache

SERVICE = "disagg.kv.KVTransfer"
TOKEN_METADATA_KEY = "x-disagg-token"


def method_path(name: str) -> str:
    """The full gRPC path of one of the service's methods."""
    return f"/{SERVICE}/{name}"


HANDSHAKE_METHOD = method_path("Handshake")
RELEASE_METHOD = method_path("Release")


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
