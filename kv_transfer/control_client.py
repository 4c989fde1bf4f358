"""Consumer side of the control plane: connections to producers, the token, first contact and
release (the wire is in control.py).

Lifecycle with one producer:
  0. First contact: `handshake` states this consumer's protocol version and KV layout hash and
     checks the producer's answer; once per endpoint, again after `forget` (a failed pull: the
     producer may have restarted with another layout).
  1. Data channels call the producer's pull methods on `channel(endpoint, i)`, one connection
     per parallel stream i, with `metadata` (the token).
  2. `release` frees the producer's lease (best effort; an unreleased lease expires).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from kv_transfer.control import (
    HANDSHAKE_METHOD,
    RELEASE_METHOD,
    TOKEN_METADATA_KEY,
    describe_rpc_error,
)
from kv_transfer.layout import Hello, mismatch
from kv_transfer.params import TransferParams
from kv_transfer.transport import TransferError
from protos import kv_transfer_pb2 as pb

Metadata = tuple[tuple[str, str], ...]


class ControlClient:
    """One consumer worker's gRPC connections to its producers. Thread-safe."""

    def __init__(self, *, auth_token: str, hello: Hello, max_message_bytes: int) -> None:
        self._hello = hello
        self._agreed: set[str] = set()  # producers whose Handshake succeeded
        self.metadata: Metadata = ((TOKEN_METADATA_KEY, auth_token),)
        self._max_message_bytes = max_message_bytes
        self._channels: dict[tuple[str, int], grpc.Channel] = {}
        self._lock = threading.Lock()

    def channel(self, endpoint: str, stream_index: int = 0) -> grpc.Channel:
        """The (cached) connection to a producer; parallel streams use distinct indices."""
        key = (endpoint, stream_index)
        with self._lock:
            channel = self._channels.get(key)
            if channel is None:
                # Distinct channel arguments keep gRPC from sharing one connection.
                channel = grpc.insecure_channel(
                    endpoint,
                    options=[
                        ("grpc.max_receive_message_length", self._max_message_bytes),
                        ("grpc.channel_id", stream_index),
                    ],
                )
                self._channels[key] = channel
            return channel

    def unary(self, endpoint: str, method: str, deserialize: Callable[[bytes], Any],
              stream_index: int = 0) -> grpc.UnaryUnaryMultiCallable:
        """A stub of one of the producer's unary methods (pass `metadata` to each call)."""
        return self.channel(endpoint, stream_index).unary_unary(
            method, request_serializer=_serialize, response_deserializer=deserialize)

    def stream(self, endpoint: str, method: str, deserialize: Callable[[bytes], Any] | None,
               stream_index: int = 0) -> grpc.UnaryStreamMultiCallable:
        """A stub of one of the producer's server-streaming methods (deserialize None: the
        raw bytes of each message)."""
        return self.channel(endpoint, stream_index).unary_stream(
            method, request_serializer=_serialize, response_deserializer=deserialize)

    def handshake(self, endpoint: str, timeout_s: float) -> None:
        """First contact with a producer: exchange protocol versions and KV layouts (once per
        endpoint, again after `forget`). Raises TransferError naming both sides' values when
        they differ."""
        with self._lock:
            if endpoint in self._agreed:
                return
        stub = self.unary(endpoint, HANDSHAKE_METHOD, pb.HandshakeResponse.FromString)
        request = pb.HandshakeRequest(consumer=self._hello.to_wire())
        try:
            answer = stub(request, timeout=timeout_s, metadata=self.metadata)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise TransferError(f"producer {endpoint} refused this consumer: "
                                    f"{err.details()}") from err
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise TransferError(f"producer {endpoint} has no Handshake: its KV transfer "
                                    f"protocol is older than this consumer's "
                                    f"({self._hello.protocol_version})") from err
            raise TransferError(describe_rpc_error(err, endpoint)) from err
        refusal = mismatch(Hello.from_wire(answer.producer), self._hello)
        if refusal:
            raise TransferError(f"producer {endpoint}: {refusal}")
        with self._lock:
            self._agreed.add(endpoint)

    def forget(self, endpoint: str) -> None:
        """Handshake with this producer again before the next pull (it may have restarted)."""
        with self._lock:
            self._agreed.discard(endpoint)

    def release(self, endpoint: str, handle: str, timeout_s: float) -> None:
        """Tell the producer it may free the handle's blocks. Best effort, never raises."""
        send_release(self.channel(endpoint), handle, self.metadata, timeout_s)

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def send_release(channel: grpc.Channel, handle: str, metadata: Metadata,
                 timeout_s: float) -> None:
    stub = channel.unary_unary(
        RELEASE_METHOD,
        request_serializer=pb.ReleaseRequest.SerializeToString,
        response_deserializer=pb.ReleaseResponse.FromString,
    )
    # On failure the producer's lease expiry frees the blocks.
    with contextlib.suppress(grpc.RpcError):
        stub(pb.ReleaseRequest(handle=handle), timeout=timeout_s, metadata=metadata)


def release_handle(transfer: TransferParams, auth_token: str, timeout_s: float = 2.0) -> None:
    """Free a published handle that no consumer will pull (best effort)."""
    with grpc.insecure_channel(transfer.endpoint) as channel:
        send_release(channel, transfer.handle, ((TOKEN_METADATA_KEY, auth_token),), timeout_s)
