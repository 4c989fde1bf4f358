"""Overlapped transfer without engines: readiness tracking (StreamTable), staging (Prefetcher)
and stream pulls over every data channel (gRPC streams, bulk TCP, nccl in gloo mode)."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import Future

import pytest
import torch

from kv_transfer.channels.base import ChannelOptions, WorkerIdentity
from kv_transfer.control_server import ControlServer
from kv_transfer.leases import ExpiredHandle, LeaseTable, UnknownHandle
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.params import PrefetchSpec
from kv_transfer.prefetch import Prefetcher
from kv_transfer.puller import KVPuller
from kv_transfer.streams import StreamFailed, StreamTable
from kv_transfer.transport import KVBlockClient, PullResult, TransferError

TOKEN = "t" * 32
NUM_BLOCKS = 16
BLOCK_SIZE = 4
NUM_LAYERS = 3


def _caches(seed: int, layout: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, 2, BLOCK_SIZE, 32) if layout == "cpu" else (2, NUM_BLOCKS, BLOCK_SIZE,
                                                                     2, 16)
    return {f"layer.{i}": torch.randn(shape, generator=gen) for i in range(NUM_LAYERS)}


def _block(tensor: torch.Tensor, block_id: int) -> torch.Tensor:
    return tensor[block_id] if tensor.shape[0] == NUM_BLOCKS else tensor[:, block_id]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _table() -> StreamTable:
    return StreamTable([100] * NUM_LAYERS, BLOCK_SIZE)


def _drain(reader, chunks: list, errors: list) -> None:
    try:
        chunks.extend(reader.chunks(1 << 20, lambda: True))
    except StreamFailed as err:
        errors.append(err)
    finally:
        reader.finish()


# StreamTable: readiness tracking


def test_layers_become_readable_as_each_step_writes_them():
    table = _table()
    # 1. step 1 computes tokens [0, 8): blocks 10 and 11; nothing is written yet
    table.advance("s", "req", 10, (10, 11), 0, 8)
    reader = table.open_reader("s", [0, 1, 2], wait_s=1, read_timeout_s=5)
    chunks: list = []
    thread = threading.Thread(target=_drain, args=(reader, chunks, []))
    thread.start()
    time.sleep(0.05)
    assert chunks == []
    # 2. layer 0 written: its two full blocks are sent, not the other layers
    table.mark_layer(0)
    time.sleep(0.05)
    assert [(p.layer_index, p.first_block, ids) for p, ids in chunks] == [(0, 0, [10, 11])]
    # 3. the rest of step 1, then step 2 with the last, partial block (tokens 8 and 9)
    table.mark_all()
    table.advance("s", "req", 10, (10, 11, 12), 8, 10)
    table.mark_all()
    thread.join(5)
    sent = {(p.layer_index, p.first_block + i): ids[i] for p, ids in chunks
            for i in range(p.num_blocks)}
    assert sent == {(layer, b): 10 + b for layer in range(NUM_LAYERS) for b in range(3)}
    assert reader.waited_s > 0
    assert table.drop_requests({"req"}) == set() and table.num_streams == 0


def test_a_partial_block_is_not_sent_before_the_prompt_is_done():
    table = _table()
    table.advance("s", "req", 10, (10, 11, 12), 0, 9)  # block 2 holds one token of two
    table.mark_all()
    reader = table.open_reader("s", [2], wait_s=1, read_timeout_s=0.2)
    with pytest.raises(StreamFailed, match="no block computed"):
        list(reader.chunks(1 << 20, lambda: True))
    reader.finish()
    table.fail("s", "aborted")


def test_an_aborted_prefill_stops_its_readers_at_once():
    table = _table()
    table.advance("s", "req", 10, (10, 11), 0, 8)
    reader = table.open_reader("s", [0, 1, 2], wait_s=1, read_timeout_s=30)
    errors: list = []
    thread = threading.Thread(target=_drain, args=(reader, [], errors))
    thread.start()
    started = time.monotonic()
    table.fail("s", "the prefill ended without a handoff (FINISHED_ABORTED)")
    thread.join(5)
    assert time.monotonic() - started < 1
    assert "FINISHED_ABORTED" in str(errors[0])
    assert table.num_streams == 0
    with pytest.raises(ExpiredHandle):
        table.open_reader("s", [0], wait_s=1, read_timeout_s=1)


def test_preemption_fails_the_stream():
    table = _table()
    table.advance("s", "req", 10, (10, 11), 0, 8)
    table.advance("s", "req", 10, (20, 21, 22), 0, 10)  # resumed in other blocks
    assert table.num_streams == 0
    with pytest.raises(ExpiredHandle, match="preempted"):
        table.open_reader("s", [0], wait_s=0, read_timeout_s=1)


def test_freed_blocks_wait_for_their_readers():
    table = _table()
    table.advance("s", "req", 8, (10, 11), 0, 8)
    table.mark_all()
    reader = table.open_reader("s", [0, 1], wait_s=1, read_timeout_s=1)
    # the lease ended while a reader still reads: vLLM must not get the blocks back yet
    assert table.drop_requests({"req"}) == {"req"}
    reader.finish()
    assert table.drop_requests({"req"}) == set()
    assert table.num_streams == 0


def test_a_reader_waits_for_a_stream_not_scheduled_yet():
    table = _table()
    threading.Timer(0.1, table.advance, args=("s", "req", 8, (1, 2), 0, 8)).start()
    reader = table.open_reader("s", [0, 1], wait_s=2, read_timeout_s=1)
    reader.finish()
    table.fail("s", "done")
    with pytest.raises(UnknownHandle):
        table.open_reader("other", [0], wait_s=0.05, read_timeout_s=1)


# Prefetcher: staging


class _FakeClient(KVBlockClient):
    def __init__(self) -> None:
        self.release_pull = threading.Event()
        self.fail = False

    def pull(self, endpoint, handle, remote_block_ids, local_block_ids, timeout_s,
             cancelled=None, *, sink=None, stream_handle=""):
        assert sink is not None and stream_handle and not handle
        self.release_pull.wait(5)
        if self.fail:
            raise TransferError("stream ended: aborted")
        for layer in range(sink.num_layers):
            sink.scatter_tensor(layer, local_block_ids, torch.full(
                (len(local_block_ids) * sink.block_bytes_per_layer[layer],), 7, dtype=torch.uint8))
        return PullResult(len(local_block_ids), 1, 10.0, producer_wait_ms=8.0)

    def release(self, endpoint, handle, timeout_s):
        pass

    def close(self):
        pass


def _prefetcher(client: KVBlockClient, max_bytes: int = 1 << 30) -> tuple[Prefetcher,
                                                                           PagedKVCache]:
    cache = PagedKVCache(_caches(1), NUM_BLOCKS)
    return Prefetcher(cache, client, max_bytes=max_bytes, ttl_s=0.2, timeout_s=5,
                      num_threads=2), cache


def test_staged_blocks_are_copied_into_the_paged_cache_and_freed():
    client = _FakeClient()
    prefetcher, cache = _prefetcher(client)
    assert prefetcher.start(PrefetchSpec("x:1", "s", 10, BLOCK_SIZE))  # 3 blocks
    assert prefetcher.bytes_in_use == 3 * cache.block_bytes
    client.release_pull.set()
    prefetch = prefetcher.claim("s")
    assert prefetch is not None and prefetcher.num_prefetches == 0
    result = prefetch.wait(time.monotonic() + 5, None)
    assert result.producer_wait_ms == 8.0
    assert prefetch.staging is not None
    cache.copy_blocks_from(prefetch.staging, [1, 2], [5, 9])
    prefetcher.free(prefetch)
    prefetcher.free(prefetch)  # exactly once
    assert prefetcher.bytes_in_use == 0
    layer = cache._layers[0]
    assert bool((layer[5].view(torch.uint8) == 7).all()) and bool((layer[9].view(torch.uint8)
                                                                   == 7).all())
    prefetcher.shutdown()


def test_a_prefetch_over_the_cap_is_skipped():
    client = _FakeClient()
    cache_block_bytes = PagedKVCache(_caches(1), NUM_BLOCKS).block_bytes
    prefetcher, _ = _prefetcher(client, max_bytes=4 * cache_block_bytes)
    assert prefetcher.start(PrefetchSpec("x:1", "a", 3 * BLOCK_SIZE, BLOCK_SIZE))
    assert not prefetcher.start(PrefetchSpec("x:1", "b", 2 * BLOCK_SIZE, BLOCK_SIZE))
    assert prefetcher.num_skipped == 1
    client.release_pull.set()
    prefetcher.cancel("a")
    _wait_for(lambda: prefetcher.bytes_in_use == 0)
    prefetcher.shutdown()


def test_failed_cancelled_and_unclaimed_prefetches_free_their_staging():
    client = _FakeClient()
    prefetcher, _ = _prefetcher(client)
    client.fail = True
    for handle in ("failed", "cancelled", "unclaimed"):
        assert prefetcher.start(PrefetchSpec("x:1", handle, 10, BLOCK_SIZE))
    prefetcher.cancel("cancelled")  # still running: freed once its pull ends
    client.release_pull.set()
    failed = prefetcher.claim("failed")
    assert failed is not None
    with pytest.raises(TransferError, match="aborted"):
        failed.wait(time.monotonic() + 5, None)
    prefetcher.free(failed)
    time.sleep(0.3)
    prefetcher.expire()  # ttl 0.2 s
    _wait_for(lambda: prefetcher.bytes_in_use == 0 and prefetcher.num_prefetches == 0)
    prefetcher.shutdown()


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# Stream pulls over every payload path


GLOO = ChannelOptions(WorkerIdentity("gloo", 1, 0), group_timeout_s=5.0)


def _producer(src, channel: str):
    leases = LeaseTable()
    cache = PagedKVCache(src, NUM_BLOCKS)
    streams = StreamTable(cache.block_bytes_per_layer, BLOCK_SIZE)
    server = ControlServer(cache, leases, bind_host="127.0.0.1", port=_free_port(),
                           auth_token=TOKEN, max_chunk_bytes=4096, handle_wait_s=0.2,
                           channels=(channel,), options=GLOO, streams=streams,
                           stream_wait_s=5)
    return server, streams, server.start()


def _consumer(dst, channel: str) -> KVBlockClient:
    return KVPuller(PagedKVCache(dst, NUM_BLOCKS), channel, auth_token=TOKEN,
                    max_chunk_bytes=4096, num_streams=2 if channel == "grpc" else 1,
                    options=GLOO)


@pytest.mark.parametrize("layout", ["cpu", "flash"])
@pytest.mark.parametrize("channel", ["tcp", "grpc", "nccl"])
def test_a_stream_pull_moves_each_layer_as_it_is_computed(channel, layout):
    src, dst = _caches(1, layout), _caches(2, layout)
    server, streams, endpoint = _producer(src, channel)
    client = _consumer(dst, channel)
    staging = PagedKVCache(dst, NUM_BLOCKS).staging(5)
    prompt_blocks = (3, 8, 1, 12, 6)  # 18 tokens: the last block holds 2 of 4
    result: Future[PullResult] = Future()

    def pull() -> None:
        try:
            result.set_result(client.pull(endpoint, "", list(range(5)), list(range(5)), 10,
                                          sink=staging, stream_handle="s"))
        except BaseException as err:  # noqa: BLE001
            result.set_exception(err)

    threading.Thread(target=pull).start()
    # the "engine": two steps of the prefill, layer by layer, with compute time between
    for blocks, (ready, target) in (((3, 8, 1), (0, 10)), ((3, 8, 1, 12, 6), (10, 18))):
        streams.advance("s", "req", 18, blocks, ready, target)
        for layer in range(NUM_LAYERS):
            time.sleep(0.05)
            streams.mark_layer(layer)
    pulled = result.result(10)
    assert pulled.num_blocks == 5 and pulled.producer_wait_ms > 50
    for name in src:
        for index, block in enumerate(prompt_blocks):
            assert torch.equal(_staged(staging, name, index), _block(src[name], block))
    # the producer's reader may still be finishing: its blocks are freed once it has
    _wait_for(lambda: streams.drop_requests({"req"}) == set() and streams.num_streams == 0)
    client.close()
    server.stop(0)


def _staged(staging: PagedKVCache, name: str, index: int) -> torch.Tensor:
    layer = staging._layers[staging.layer_names.index(name)]
    block = layer[index] if layer.shape[0] == staging.num_blocks else layer[:, index]
    return block.view(torch.float32)


@pytest.mark.parametrize("channel", ["tcp", "grpc", "nccl"])
def test_a_stream_that_fails_mid_prefill_fails_the_pull_quickly(channel):
    src, dst = _caches(1), _caches(2)
    server, streams, endpoint = _producer(src, channel)
    client = _consumer(dst, channel)
    staging = PagedKVCache(dst, NUM_BLOCKS).staging(4)
    streams.advance("s", "req", 16, (3, 8), 0, 8)
    streams.mark_all()
    threading.Timer(0.2, streams.fail, args=("s", "aborted by the client")).start()
    started = time.monotonic()
    with pytest.raises(TransferError):
        client.pull(endpoint, "", [0, 1, 2, 3], [0, 1, 2, 3], 10, sink=staging,
                    stream_handle="s")
    assert time.monotonic() - started < 3
    _wait_for(lambda: streams.num_streams == 0)
    client.close()
    server.stop(0)
