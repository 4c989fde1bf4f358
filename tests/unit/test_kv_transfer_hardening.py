"""The KV transfer layer against hostile or broken peers (no engine, no Ray, loopback only).

Each test plays the bad peer with a raw socket or a raw gRPC call and checks that the honest side
refuses early (before it allocates, parses or holds anything) and keeps serving good peers."""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
from datetime import timedelta

import grpc
import psutil
import pytest
import torch
from torch.distributed import TCPStore

from kv_transfer import control
from kv_transfer.channels import bulk_tcp
from kv_transfer.channels.base import ChannelOptions, WorkerIdentity
from kv_transfer.channels.bulk_tcp import TICKET_BYTES, BulkSender, receive_blocks
from kv_transfer.channels.collective_consumer import CollectiveConsumer
from kv_transfer.channels.grpc_stream import PULL_METHOD
from kv_transfer.channels.pair_group import host_store
from kv_transfer.chunks import FRAME
from kv_transfer.control import TOKEN_METADATA_KEY
from kv_transfer.control_server import ControlServer
from kv_transfer.leases import LeaseTable
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.puller import KVPuller
from kv_transfer.sink import ChunkSink
from kv_transfer.streams import LeasePull
from kv_transfer.transport import TransferError
from protos import kv_transfer_pb2 as pb

TOKEN = "t" * 32
NUM_BLOCKS = 16
GLOO = WorkerIdentity("gloo", tp_size=1, tp_rank=0)


def _cache(seed: int) -> PagedKVCache:
    gen = torch.Generator().manual_seed(seed)
    layers = {f"layer.{i}": torch.randn((NUM_BLOCKS, 2, 8, 32), generator=gen) for i in range(3)}
    return PagedKVCache(layers, NUM_BLOCKS)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def server():
    cache, leases = _cache(1), LeaseTable()
    kv_server = ControlServer(cache, leases, bind_host="127.0.0.1", port=_free_port(),
                              auth_token=TOKEN, max_chunk_bytes=4096, handle_wait_s=0.1)
    endpoint = kv_server.start()
    yield kv_server, leases, endpoint
    kv_server.stop(0)
    assert leases.num_leases == 0, "a test left a lease behind"


# --- 1. bulk data port: bounded connections, one deadline for the ticket --------------------


class _SlowLoris:
    """Connects to the data port and trickles a ticket one byte every 0.1 s (3.2 s in all)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        self.num_sent = 0
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        try:
            for _ in range(TICKET_BYTES):
                self.sock.sendall(b"x")
                self.num_sent += 1
                time.sleep(0.1)
        except OSError:
            pass  # the server closed the connection: what the test waits for

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_slow_loris_on_the_bulk_port_is_cut_at_the_deadline_and_good_clients_are_served():
    cache, leases = _cache(1), LeaseTable()
    sender = BulkSender(cache, "127.0.0.1", max_connections=2, ticket_read_s=0.5)
    loris = [_SlowLoris(sender.port) for _ in range(2)]
    try:
        # 1. Both slots are taken by clients trickling their ticket.
        assert _wait_until(lambda: sender.num_connections == 2, 2), "slow clients not accepted"
        started = time.monotonic()
        # 2. A third connection is refused (closed at once), not queued or given a thread.
        with socket.create_connection(("127.0.0.1", sender.port), timeout=2) as extra:
            try:
                closed = extra.recv(1) == b""
            except ConnectionResetError:
                closed = True
        assert closed and sender.num_refused >= 1
        # 3. The slow clients lose their slots at the ticket deadline, long before they would
        #    have finished trickling (a per-recv timeout never fires on them).
        assert _wait_until(lambda: sender.num_connections == 0, 2.0)
        assert time.monotonic() - started < 1.5
        assert all(client.num_sent < TICKET_BYTES for client in loris)
        # 4. A consumer with a real ticket is still served in full.
        leases.grant("h1", "req-1", (2, 5, 7), lease_s=10)
        leases.acquire("h1", [2, 5, 7])
        ticket = sender.issue(LeasePull(cache, leases, "h1", [2, 5, 7]), 4096)
        sink = ChunkSink(_cache(2), [0, 1, 2])
        receive_blocks(("127.0.0.1", sender.port), ticket, sink, time.monotonic() + 5,
                       lambda: False, 4096)
        assert sink.num_bytes == 3 * cache.block_bytes
        sink.check_complete("the data port")  # every layer of every block arrived
    finally:
        for client in loris:
            client.close()
        sender.stop()
    # 5. Nothing leaked: the pull's reader was returned, so a release frees at once.
    assert leases.release("h1") == 3 and leases.take_freed() == {"req-1"}
    assert sender.num_connections == 0 and sender.num_tickets == 0


def test_stop_cuts_a_connection_waiting_for_its_ticket():
    sender = BulkSender(_cache(1), "127.0.0.1", ticket_read_s=30)
    with socket.create_connection(("127.0.0.1", sender.port), timeout=2):
        assert _wait_until(lambda: sender.num_connections == 1, 2)
        sender.stop()
        assert _wait_until(lambda: sender.num_connections == 0, 2)


# --- 2. frame sizes are checked before anything is allocated ------------------------------


class _LyingProducer:
    """A data port that reads a ticket, announces one frame header, then sends nothing."""

    def __init__(self, header: bytes) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._header = header
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            conn.recv(TICKET_BYTES)
            conn.sendall(self._header)
            self._done.wait(10)

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self._listener.close()


BLOCK_BYTES = 2 * 8 * 32 * 4  # one block of one layer of _cache


@pytest.mark.parametrize(
    ("layer", "first", "count", "size"),
    [
        (0, 0, 1, 256 << 20),  # one block announced as 256 MiB
        (0, 0, 2, 2 * BLOCK_BYTES + 8),  # not a whole number of blocks
        (7, 0, 1, BLOCK_BYTES),  # a layer the consumer does not have
        (0, 2, 3, 3 * BLOCK_BYTES),  # blocks past the 4 asked for
        (0, 0, 3, 3 * BLOCK_BYTES),  # right for the layout, larger than the chunk asked for
    ],
    ids=["oversize", "partial-block", "unknown-layer", "past-request", "over-chunk"],
)
def test_a_frame_the_consumer_did_not_ask_for_is_refused_before_allocating(
    layer, first, count, size
):
    producer = _LyingProducer(FRAME.pack(layer, first, count, size))
    sink = ChunkSink(_cache(2), [0, 1, 2, 3])
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(TransferError, match="malformed frame"):
            receive_blocks(("127.0.0.1", producer.port), b"k" * TICKET_BYTES, sink,
                           time.monotonic() + 5, lambda: False, 4096)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        producer.close()
    assert peak_bytes < 1 << 20, f"{peak_bytes} bytes allocated for a refused frame"
    assert time.monotonic() - started < 2, "refused only after waiting for the payload"
    assert sink.num_bytes == 0, "stored a bad frame"


def test_a_chunk_buffer_beyond_the_absolute_cap_is_refused():
    with pytest.raises(TransferError, match="cap"):
        receive_blocks(("127.0.0.1", _free_port()), b"k" * TICKET_BYTES,
                       ChunkSink(_cache(2), [1]), time.monotonic() + 1, lambda: False,
                       bulk_tcp.MAX_FRAME_BYTES + 1)


def test_collective_consumer_refuses_an_oversize_chunk_announcement(monkeypatch):
    cache, leases = _cache(1), LeaseTable()
    kv_server = ControlServer(cache, leases, bind_host="127.0.0.1", port=_free_port(),
                              auth_token=TOKEN, max_chunk_bytes=4096, handle_wait_s=0.1,
                              channels=("nccl",), options=ChannelOptions(GLOO, 3.0))
    sender = kv_server.channels["nccl"]
    endpoint = kv_server.start()

    def lying_send(group_name, source, chunk_bytes, is_active, streamed):
        yield pb.CollectiveProgress(num_bytes=1 << 40, chunk_bytes=1 << 40)

    monkeypatch.setattr(sender, "send", lying_send)
    client = KVPuller(_cache(2), "nccl", auth_token=TOKEN, max_chunk_bytes=4096,
                      options=ChannelOptions(GLOO))
    staged: list[int] = []
    real_staging = CollectiveConsumer._staging

    def spy_staging(self, entry, num_bytes):
        staged.append(num_bytes)
        return real_staging(self, entry, num_bytes)

    monkeypatch.setattr(CollectiveConsumer, "_staging", spy_staging)
    leases.grant("h1", "req-1", (1, 2), lease_s=10)
    try:
        with pytest.raises(TransferError, match="announced"):
            client.pull(endpoint, "h1", [1, 2], [1, 2], timeout_s=5)
        assert staged == [], "a staging buffer was sized from the producer's announcement"
    finally:
        client.close()
        kv_server.stop(0)
    assert leases.release("h1") == 2


# --- 3. the nccl transport's rendezvous store listens on bind_host only --------------------


def _listeners(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_rendezvous_store_listens_only_on_the_bind_host():
    store = host_store("127.0.0.1", timeout_s=5)
    assert _listeners(store.port) == {"127.0.0.1"}, "TCPStore listens beyond bind_host"
    client = TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=5))
    client.set("disagg-kv/probe", "ok")
    assert store.get("disagg-kv/probe") == b"ok"
    port = store.port
    del client, store
    assert _wait_until(lambda: not _listeners(port), 2), "the store's socket outlived it"


# --- 4. the gRPC server: token before parsing, small requests, no duplicate block ids ------


def _raw_call(endpoint: str, method: str, body: bytes, metadata=()) -> grpc.StatusCode:
    with grpc.insecure_channel(endpoint) as channel:
        call = channel.unary_unary(method)  # raw bytes both ways: nothing parsed client-side
        try:
            call(body, timeout=5, metadata=metadata)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", [PULL_METHOD, bulk_tcp.OPEN_BULK_METHOD,
                                    control.RELEASE_METHOD])
def test_calls_without_the_token_are_refused_before_their_request_is_parsed(server, method):
    _, _, endpoint = server
    garbage = b"\xff" * 64  # not a parseable protobuf message
    assert _raw_call(endpoint, method, garbage) == grpc.StatusCode.UNAUTHENTICATED
    wrong = ((TOKEN_METADATA_KEY, "x" * 32),)
    assert _raw_call(endpoint, method, garbage, wrong) == grpc.StatusCode.UNAUTHENTICATED
    # With the token the same bytes reach the parser, and fail there.
    right = ((TOKEN_METADATA_KEY, TOKEN),)
    assert _raw_call(endpoint, method, garbage, right) != grpc.StatusCode.UNAUTHENTICATED


def test_oversize_control_requests_are_refused(server):
    _, _, endpoint = server
    request = pb.PullRequest(handle="h", block_ids=list(range(200_000))).SerializeToString()
    right = ((TOKEN_METADATA_KEY, TOKEN),)
    code = _raw_call(endpoint, PULL_METHOD, request, right)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("bulk", [False, True], ids=["grpc", "bulk"])
def test_duplicate_block_ids_are_refused_before_anything_is_held(server, bulk):
    kv_server, leases, endpoint = server
    leases.grant("h1", "req-1", (1, 2, 3), lease_s=10)
    client = KVPuller(_cache(2), "tcp" if bulk else "grpc", auth_token=TOKEN,
                      max_chunk_bytes=4096)
    try:
        with pytest.raises(TransferError, match="malformed request.*duplicate block ids"):
            client.pull(endpoint, "h1", [1, 2, 1], [4, 5, 6], timeout_s=5)
    finally:
        client.close()
    assert kv_server.channels["tcp"].num_tickets == 0
    # No reader was taken on the lease: a release frees its blocks at once.
    assert leases.release("h1") == 3 and leases.take_freed() == {"req-1"}
