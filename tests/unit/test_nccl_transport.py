"""The nccl transport in gloo mode between two paged KV caches, in one process (no engine).

Producer and consumer sides live in one process here (two threads build the two ranks of each
pair group); the code is the one the connector runs in two processes."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
import torch

from kv_transfer.channels.base import ChannelOptions, WorkerIdentity
from kv_transfer.channels.collective import JOIN_METHOD
from kv_transfer.control import TOKEN_METADATA_KEY
from kv_transfer.control_server import ControlServer
from kv_transfer.leases import LeaseTable
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.puller import KVPuller
from kv_transfer.transport import TransferError
from protos import kv_transfer_pb2 as pb

TOKEN = "t" * 32
NUM_BLOCKS = 16
GLOO = WorkerIdentity("gloo", tp_size=1, tp_rank=0)


def _caches(seed: int, layout: str, num_layers: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, 2, 8, 32) if layout == "cpu" else (2, NUM_BLOCKS, 8, 2, 16)
    return {f"layer.{i}": torch.randn(shape, generator=gen) for i in range(num_layers)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Producer:
    def __init__(self, src: dict[str, torch.Tensor], port: int, timeout_s: float = 3.0):
        self.leases = LeaseTable()
        cache = PagedKVCache(src, NUM_BLOCKS)
        self.server = ControlServer(cache, self.leases, bind_host="127.0.0.1", port=port,
                                    auth_token=TOKEN, max_chunk_bytes=4096, handle_wait_s=0.2,
                                    channels=("nccl",), options=ChannelOptions(GLOO, timeout_s))
        self.sender = self.server.channels["nccl"]
        self.endpoint = self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


def _client(dst: dict[str, torch.Tensor], identity: WorkerIdentity = GLOO) -> KVPuller:
    return KVPuller(PagedKVCache(dst, NUM_BLOCKS), "nccl", auth_token=TOKEN,
                    max_chunk_bytes=4096, options=ChannelOptions(identity))


def _block(tensor: torch.Tensor, block_id: int) -> torch.Tensor:
    return tensor[block_id] if tensor.shape[0] == NUM_BLOCKS else tensor[:, block_id]


@pytest.fixture(params=["cpu", "flash"])
def pair(request):
    src, dst = _caches(1, request.param), _caches(2, request.param)
    producer = Producer(src, _free_port())
    client = _client(dst)
    yield src, dst, producer, client
    client.close()
    producer.stop()
    assert producer.leases.num_leases == 0, "a test left a lease behind"


def test_pull_moves_exactly_the_requested_blocks_and_reuses_the_group(pair):
    src, dst, producer, client = pair
    untouched = {name: t.clone() for name, t in dst.items()}
    # 1. two pulls over the same pair: one group, built lazily on the first
    producer.leases.grant("h1", "req-1", (3, 5, 7, 9), lease_s=10)
    producer.leases.grant("h2", "req-2", (1, 2), lease_s=10)
    first = client.pull(producer.endpoint, "h1", [5, 9, 3], [0, 1, 2], timeout_s=5)
    second = client.pull(producer.endpoint, "h2", [2, 1], [10, 11], timeout_s=5)
    assert client.channel.num_joins == 1 and producer.sender.num_groups == 1
    # 2. the blocks landed where asked, nothing else changed
    for name in src:
        for remote, local in ((5, 0), (9, 1), (3, 2), (2, 10), (1, 11)):
            assert torch.equal(_block(dst[name], local), _block(src[name], remote))
        assert torch.equal(_block(dst[name], 4), _block(untouched[name], 4))
    assert first.transfer_bytes == 3 * sum(_block(t, 0).numel() * 4 for t in src.values())
    assert second.num_blocks == 2
    # 3. release over gRPC frees the leases
    for handle in ("h1", "h2"):
        client.release(producer.endpoint, handle, timeout_s=2)
    assert producer.leases.take_freed() == {"req-1", "req-2"}


def test_lease_errors_are_clear_and_leave_the_group_usable(pair):
    _, _, producer, client = pair
    with pytest.raises(TransferError, match="does not know the transfer handle"):
        client.pull(producer.endpoint, "nope", [1], [1], timeout_s=5)
    producer.leases.grant("h3", "req-3", (4,), lease_s=10)
    client.pull(producer.endpoint, "h3", [4], [4], timeout_s=5)
    assert client.channel.num_joins == 1, "a refused pull must not cost the pair its group"
    client.release(producer.endpoint, "h3", timeout_s=2)
    producer.leases.take_freed()


def test_a_cancelled_pull_writes_nothing_and_keeps_the_group(pair):
    _, dst, producer, client = pair
    before = {name: t.clone() for name, t in dst.items()}
    producer.leases.grant("h4", "req-4", tuple(range(12)), lease_s=10)
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(TransferError, match="cancelled"):
        client.pull(producer.endpoint, "h4", list(range(12)), list(range(12)), timeout_s=5,
                    cancelled=cancelled)
    assert all(torch.equal(before[name], dst[name]) for name in dst)
    # the chunks were drained: the producer's reader ended and the group is still in step
    client.release(producer.endpoint, "h4", timeout_s=2)
    assert producer.leases.take_freed() == {"req-4"}
    producer.leases.grant("h5", "req-5", (0, 1), lease_s=10)
    client.pull(producer.endpoint, "h5", [0, 1], [0, 1], timeout_s=5)
    assert client.channel.num_joins == 1
    client.release(producer.endpoint, "h5", timeout_s=2)
    producer.leases.take_freed()


def test_a_dropped_group_is_rebuilt_under_a_new_name(pair):
    _, _, producer, client = pair
    producer.leases.grant("h8", "req-8", (0, 1), lease_s=10)
    client.pull(producer.endpoint, "h8", [0], [0], timeout_s=5)
    (first_name,) = client.channel.group_names
    producer.sender._drop(first_name)  # as after a failed send
    # 1. the producer refuses the stale name; 2. the consumer rejoins once and succeeds
    client.pull(producer.endpoint, "h8", [1], [1], timeout_s=5)
    (second_name,) = client.channel.group_names
    assert client.channel.num_joins == 2 and second_name != first_name
    client.release(producer.endpoint, "h8", timeout_s=2)
    producer.leases.take_freed()


def test_restarted_producer_gets_a_fresh_group():
    src, dst = _caches(1, "cpu"), _caches(2, "cpu")
    port = _free_port()
    client = _client(dst)
    producer = Producer(src, port)
    producer.leases.grant("h5", "req-5", (2,), lease_s=10)
    client.pull(producer.endpoint, "h5", [2], [2], timeout_s=5)
    producer.stop()
    # 1. a pull while the producer is gone fails cleanly
    with pytest.raises(TransferError, match="unreachable|failed"):
        client.pull(producer.endpoint, "h5", [2], [2], timeout_s=3)
    # 2. the restarted producer (same endpoint, new process state) pairs anew
    restarted = Producer(src, port)
    try:
        restarted.leases.grant("h6", "req-6", (7,), lease_s=10)
        _pull_once_reachable(client, restarted.endpoint, "h6", [7], [3])
        assert torch.equal(dst["layer.0"][3], src["layer.0"][7])
        assert client.channel.num_joins == 2
        client.release(restarted.endpoint, "h6", timeout_s=2)
    finally:
        client.close()
        restarted.stop()


def _pull_once_reachable(client, endpoint, handle, remote, local, wait_s=10.0):
    """gRPC waits out its reconnect backoff before it dials a restarted server again."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.pull(endpoint, handle, remote, local, timeout_s=5)
        except TransferError as err:
            if "unreachable" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize(
    ("identity", "layers", "message"),
    [
        (WorkerIdentity("gloo", tp_size=2, tp_rank=0), 3, "tensor-parallel layouts differ"),
        (WorkerIdentity("nccl", tp_size=1, tp_rank=0), 3, "collective backends differ"),
        (GLOO, 2, "KV layouts differ"),
    ],
)
def test_join_refuses_a_mismatched_consumer(identity, layers, message):
    producer = Producer(_caches(1, "cpu"), _free_port())
    client = _client(_caches(2, "cpu", num_layers=layers), identity)
    try:
        producer.leases.grant("h7", "req-7", (1,), lease_s=10)
        with pytest.raises(TransferError, match=message):
            client.pull(producer.endpoint, "h7", [1], [1], timeout_s=5)
        assert producer.sender.num_groups == 0
        producer.leases.release("h7")
    finally:
        client.close()
        producer.stop()


def test_join_needs_the_cluster_token():
    producer = Producer(_caches(1, "cpu"), _free_port())
    try:
        with grpc.insecure_channel(producer.endpoint) as channel:
            join = channel.unary_unary(JOIN_METHOD,
                                       request_serializer=pb.JoinRequest.SerializeToString,
                                       response_deserializer=pb.JoinResponse.FromString)
            with pytest.raises(grpc.RpcError) as err:
                join(pb.JoinRequest(peer_id="x", backend="gloo", tp_size=1),
                     metadata=((TOKEN_METADATA_KEY, "w" * 32),), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        producer.stop()
