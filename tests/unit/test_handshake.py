"""First contact: protocol version and KV layout hash, refused on mismatch with both sides named.

No engine, no Ray: a producer's gRPC server and a consumer's client in one process."""

from __future__ import annotations

import socket

import grpc
import pytest
import torch

from kv_transfer import control
from kv_transfer.channels.base import ChannelOptions, WorkerIdentity
from kv_transfer.control_server import ControlServer
from kv_transfer.layout import PROTOCOL_VERSION, Hello, KVLayout, mismatch
from kv_transfer.leases import LeaseTable
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.puller import KVPuller
from kv_transfer.transport import TransferError
from protos import kv_transfer_pb2 as pb

TOKEN = "t" * 32
NUM_BLOCKS = 8
GLOO = WorkerIdentity("gloo", 1, 0)


def _cache(num_kv_heads: int = 2, dtype: torch.dtype = torch.float32) -> PagedKVCache:
    layers = {f"layer.{i}": torch.zeros(NUM_BLOCKS, num_kv_heads, 4, 16, dtype=dtype)
              for i in range(2)}
    return PagedKVCache(layers, NUM_BLOCKS)


def _layout(cache: PagedKVCache, num_kv_heads: int = 2) -> KVLayout:
    return KVLayout.of_cache(cache, num_kv_heads=num_kv_heads, head_dim=8, block_size=4)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def producer():
    cache, leases = _cache(), LeaseTable()
    server = ControlServer(cache, leases, bind_host="127.0.0.1", port=_free_port(),
                           auth_token=TOKEN, max_chunk_bytes=4096, handle_wait_s=0.2,
                           channels=("grpc", "tcp", "nccl"), options=ChannelOptions(GLOO, 5.0),
                           layout=_layout(cache))
    endpoint = server.start()
    leases.grant("h1", "req-1", (1, 2), lease_s=10)
    yield endpoint, leases, server.channels["nccl"]
    server.stop(0)


@pytest.mark.parametrize("bulk_tcp", [False, True], ids=["grpc", "bulk"])
def test_a_consumer_with_another_layout_is_refused_before_any_block_moves(producer, bulk_tcp):
    endpoint, leases, _ = producer
    # 1. The consumer runs a model with 4 KV heads; the producer has 2.
    consumer = _cache(num_kv_heads=4)
    client = KVPuller(consumer, "tcp" if bulk_tcp else "grpc", auth_token=TOKEN,
                      max_chunk_bytes=4096, layout=_layout(consumer, num_kv_heads=4))
    # 2. Its first pull fails at the handshake, naming both sides' values.
    with pytest.raises(TransferError) as caught:
        client.pull(endpoint, "h1", [1, 2], [0, 1], timeout_s=5)
    message = str(caught.value)
    assert "KV layouts differ" in message
    assert "producer has protocol 1, 2 layers x 2 kv heads" in message
    assert "consumer has protocol 1, 2 layers x 4 kv heads" in message
    assert _layout(consumer, 4).compat_hash in message and _layout(_cache()).compat_hash in message
    # 3. Nothing was read from the lease: it is still whole, and the consumer's cache untouched.
    assert leases.num_leased_blocks == 2
    assert all(not layer.any() for layer in consumer._layers)
    client.close()
    leases.release("h1")


def test_a_consumer_with_the_same_layout_handshakes_once_then_pulls(producer):
    endpoint, leases, _ = producer
    consumer = _cache()
    client = KVPuller(consumer, "grpc", auth_token=TOKEN, max_chunk_bytes=4096,
                      layout=_layout(consumer))
    assert client.pull(endpoint, "h1", [1, 2], [0, 1], timeout_s=5).num_blocks == 2
    leases.grant("h2", "req-2", (3,), lease_s=10)
    assert client.pull(endpoint, "h2", [3], [2], timeout_s=5).num_blocks == 1
    client.release(endpoint, "h1", 2.0)
    client.release(endpoint, "h2", 2.0)
    client.close()
    assert leases.num_leases == 0


def test_another_protocol_version_is_refused_with_both_versions_named(producer):
    endpoint, _, _ = producer
    cache = _cache()
    old = Hello(PROTOCOL_VERSION + 1, _layout(cache), _layout(cache).compat_hash)
    with grpc.insecure_channel(endpoint) as channel:
        stub = channel.unary_unary(
            control.HANDSHAKE_METHOD,
            request_serializer=pb.HandshakeRequest.SerializeToString,
            response_deserializer=pb.HandshakeResponse.FromString)
        with pytest.raises(grpc.RpcError) as caught:
            stub(pb.HandshakeRequest(consumer=old.to_wire()), timeout=5,
                 metadata=((control.TOKEN_METADATA_KEY, TOKEN),))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = caught.value.details()
    assert "protocol versions differ" in details
    assert f"producer has protocol {PROTOCOL_VERSION}," in details
    assert f"consumer has protocol {PROTOCOL_VERSION + 1}," in details


def test_the_collective_transport_handshakes_before_joining_a_group(producer):
    endpoint, leases, sender = producer
    consumer = _cache(dtype=torch.float16)  # same shape, another dtype
    client = KVPuller(consumer, "nccl", auth_token=TOKEN, max_chunk_bytes=4096,
                      layout=_layout(consumer), options=ChannelOptions(GLOO))
    with pytest.raises(TransferError, match="KV layouts differ.*float32.*float16"):
        client.pull(endpoint, "h1", [1, 2], [0, 1], timeout_s=5)
    assert sender.num_groups == 0 and client.channel.num_joins == 0
    client.close()
    leases.release("h1")


def test_the_layout_hash_covers_every_field():
    base = KVLayout(32, 8, 128, "bfloat16", 16, (65536,) * 32)
    variants = [
        KVLayout(31, 8, 128, "bfloat16", 16, (65536,) * 31),
        KVLayout(32, 4, 128, "bfloat16", 16, (65536,) * 32),
        KVLayout(32, 8, 64, "bfloat16", 16, (65536,) * 32),
        KVLayout(32, 8, 128, "float16", 16, (65536,) * 32),
        KVLayout(32, 8, 128, "bfloat16", 32, (65536,) * 32),
        KVLayout(32, 8, 128, "bfloat16", 16, (32768,) * 32),
    ]
    assert len({base.compat_hash, *(v.compat_hash for v in variants)}) == 1 + len(variants)
    assert mismatch(Hello.mine(base), Hello.mine(base)) == ""
    assert KVLayout.from_wire(base.to_wire()) == base
