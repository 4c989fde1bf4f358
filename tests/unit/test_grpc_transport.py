"""The control plane and the gRPC-authorized data channels between two paged KV caches, in one
process (no engine, no Ray).

Every test runs for both paged layouts and both data channels (gRPC stream, bulk TCP), with one
and two streams per pull."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
import torch

from kv_transfer import control
from kv_transfer.channels import bulk_tcp
from kv_transfer.control_server import ControlServer
from kv_transfer.leases import LeaseTable
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.puller import KVPuller
from kv_transfer.sink import ChunkSink
from kv_transfer.transport import TransferError
from protos import kv_transfer_pb2 as pb

TOKEN = "t" * 32
NUM_BLOCKS = 16


def _caches(seed: int, layout: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, 2, 8, 32) if layout == "cpu" else (2, NUM_BLOCKS, 8, 2, 16)
    return {f"layer.{i}": torch.randn(shape, generator=gen) for i in range(3)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(
    params=[("cpu", False, 1), ("flash", False, 2), ("cpu", True, 2), ("flash", True, 1)],
    ids=["cpu-grpc-1", "flash-grpc-2", "cpu-bulk-2", "flash-bulk-1"],
)
def pair(request):
    layout, bulk_tcp, num_streams = request.param
    src, dst = _caches(1, layout), _caches(2, layout)
    leases = LeaseTable()
    server = ControlServer(
        PagedKVCache(src, NUM_BLOCKS), leases, bind_host="127.0.0.1", port=_free_port(),
        auth_token=TOKEN, max_chunk_bytes=4096, handle_wait_s=0.2,
    )
    endpoint = server.start()
    client = KVPuller(PagedKVCache(dst, NUM_BLOCKS), "tcp" if bulk_tcp else "grpc",
                      auth_token=TOKEN, max_chunk_bytes=4096, num_streams=num_streams)
    yield src, dst, leases, endpoint, client
    client.close()
    server.stop(0)
    assert leases.num_leases == 0, "a test left a lease behind"


def _block(tensor: torch.Tensor, block_id: int, layout: str) -> torch.Tensor:
    return tensor[block_id] if tensor.shape[0] == NUM_BLOCKS else tensor[:, block_id]


def test_pull_copies_exactly_the_requested_blocks(pair):
    src, dst, leases, endpoint, client = pair
    untouched = {name: t.clone() for name, t in dst.items()}
    leases.grant("h1", "req-1", (3, 5, 7, 9), lease_s=10)
    result = client.pull(endpoint, "h1", [5, 9, 3], [0, 1, 2], timeout_s=5)
    assert result.num_blocks == 3
    for name in src:
        for remote, local in ((5, 0), (9, 1), (3, 2)):
            assert torch.equal(_block(dst[name], local, ""), _block(src[name], remote, ""))
        assert torch.equal(_block(dst[name], 4, ""), _block(untouched[name], 4, ""))
    assert result.transfer_bytes == sum(
        _block(t, 0, "").numel() * 4 * 3 for t in src.values()
    )
    client.release(endpoint, "h1", timeout_s=2)
    assert leases.take_freed() == {"req-1"}


def test_unknown_handle_fails_clearly(pair):
    _, _, _, endpoint, client = pair
    with pytest.raises(TransferError, match="does not know the transfer handle"):
        client.pull(endpoint, "nope", [1], [1], timeout_s=5)


def test_released_handle_cannot_be_pulled_again(pair):
    _, _, leases, endpoint, client = pair
    leases.grant("h2", "req-2", (1,), lease_s=10)
    client.release(endpoint, "h2", timeout_s=2)
    with pytest.raises(TransferError, match="no longer valid"):
        client.pull(endpoint, "h2", [1], [1], timeout_s=5)
    assert leases.take_freed() == {"req-2"}


def test_blocks_outside_the_lease_are_refused(pair):
    _, _, leases, endpoint, client = pair
    leases.grant("h3", "req-3", (1, 2), lease_s=10)
    with pytest.raises(TransferError, match="refused the block list"):
        client.pull(endpoint, "h3", [1, 4], [1, 4], timeout_s=5)
    leases.release("h3")


def test_wrong_token_is_rejected(pair):
    src, _, leases, endpoint, _ = pair
    leases.grant("h4", "req-4", (1,), lease_s=10)
    intruder = KVPuller(PagedKVCache(_caches(3), NUM_BLOCKS), "tcp", auth_token="x" * 32,
                        max_chunk_bytes=4096)
    with pytest.raises(TransferError, match="rejected the cluster token"):
        intruder.pull(endpoint, "h4", [1], [1], timeout_s=5)
    intruder.release(endpoint, "h4", timeout_s=2)
    assert leases.num_leases == 1, "a release without the token must not free blocks"
    intruder.close()
    leases.release("h4")


def test_unreachable_producer_fails_within_deadline(pair):
    _, _, _, _, client = pair
    with pytest.raises(TransferError, match="unreachable|deadline"):
        client.pull(f"127.0.0.1:{_free_port()}", "h", [1], [1], timeout_s=2)


def test_cancelled_pull_stops_and_frees_the_reader(pair):
    _, _, leases, endpoint, client = pair
    leases.grant("h5", "req-5", tuple(range(NUM_BLOCKS)), lease_s=10)
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(TransferError, match="cancelled"):
        client.pull(endpoint, "h5", list(range(NUM_BLOCKS)), list(range(NUM_BLOCKS)), 5, cancelled)
    client.release(endpoint, "h5", timeout_s=2)
    # the cancelled reader may still be ending on the server: its blocks are freed once it has
    freed: set[str] = set()
    deadline = time.monotonic() + 5
    while freed != {"req-5"} and time.monotonic() < deadline:
        time.sleep(0.02)
        freed |= leases.take_freed()
    assert freed == {"req-5"}


def test_stream_cut_midway_fails_and_keeps_the_lease_releasable(pair, monkeypatch):
    from tests.integration.faults import CuttingProxy

    src, _, leases, endpoint, client = pair
    leases.grant("h6", "req-6", tuple(range(NUM_BLOCKS)), lease_s=10)
    block_bytes = sum(t[0].numel() * 4 if t.shape[0] == NUM_BLOCKS else t[:, 0].numel() * 4
                      for t in src.values())
    cut_after = block_bytes * NUM_BLOCKS // 3
    proxies: list[CuttingProxy] = []
    real_receive = bulk_tcp.receive_blocks

    def receive_via_proxy(address, *args):
        proxies.append(CuttingProxy(f"{address[0]}:{address[1]}", cut_after))
        host, port = proxies[-1].endpoint.rsplit(":", 1)
        return real_receive((host, int(port)), *args)

    monkeypatch.setattr(bulk_tcp, "receive_blocks", receive_via_proxy)
    grpc_proxy = CuttingProxy(endpoint, cut_after)
    try:
        with pytest.raises(TransferError, match="ended early|closed|failed|unreachable"):
            client.pull(grpc_proxy.endpoint, "h6", list(range(NUM_BLOCKS)),
                        list(range(NUM_BLOCKS)), timeout_s=5)
        assert grpc_proxy.num_cuts + sum(p.num_cuts for p in proxies) >= 1
    finally:
        grpc_proxy.close()
        for proxy in proxies:
            proxy.close()
    client.release(endpoint, "h6", timeout_s=2)
    deadline = time.monotonic() + 5
    while leases.num_leases and time.monotonic() < deadline:
        time.sleep(0.05)  # the producer notices the cut connection, then frees
    assert leases.take_freed() == {"req-6"}


def test_bulk_ticket_is_single_use(pair):
    src, dst, leases, endpoint, _ = pair
    leases.grant("h7", "req-7", (2, 3), lease_s=10)
    client = KVPuller(PagedKVCache(dst, NUM_BLOCKS), "tcp", auth_token=TOKEN,
                      max_chunk_bytes=4096)
    channel = client.control.channel(endpoint, 0)
    open_bulk = channel.unary_unary(bulk_tcp.OPEN_BULK_METHOD,
                                    request_serializer=pb.PullRequest.SerializeToString,
                                    response_deserializer=pb.BulkTicket.FromString)
    ticket = open_bulk(pb.PullRequest(handle="h7", block_ids=[2, 3], max_chunk_bytes=4096),
                       metadata=((control.TOKEN_METADATA_KEY, TOKEN),), timeout=5)
    address = (endpoint.rsplit(":", 1)[0], ticket.port)

    def read() -> int:
        sink = ChunkSink(PagedKVCache(dst, NUM_BLOCKS), [0, 1])
        bulk_tcp.receive_blocks(address, ticket.ticket, sink, time.monotonic() + 5,
                                lambda: False, 4096)
        return sink.num_bytes

    assert read() > 0
    with pytest.raises(TransferError, match="closed"):
        read()
    client.close()
    leases.release("h7")


def test_calls_without_a_token_are_rejected(pair):
    _, _, leases, endpoint, _ = pair
    leases.grant("h8", "req-8", (1,), lease_s=10)
    with grpc.insecure_channel(endpoint) as channel:
        release = channel.unary_unary(control.RELEASE_METHOD,
                                      request_serializer=pb.ReleaseRequest.SerializeToString,
                                      response_deserializer=pb.ReleaseResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            release(pb.ReleaseRequest(handle="h8"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert leases.num_leases == 1
    leases.release("h8")


def test_server_listens_only_on_the_configured_address():
    import psutil

    def listeners() -> set[tuple[str, int]]:
        return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN}

    before = listeners()
    server = ControlServer(PagedKVCache(_caches(1), NUM_BLOCKS), LeaseTable(),
                           bind_host="127.0.0.1", port=_free_port(), auth_token=TOKEN,
                           max_chunk_bytes=4096, handle_wait_s=0.1)
    endpoint = server.start()
    try:
        ours = listeners() - before  # the gRPC port and the bulk data port
        assert int(endpoint.rsplit(":", 1)[1]) in {port for _, port in ours}
        assert len(ours) == 2, ours
        assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in ours), ours
    finally:
        server.stop(0)
