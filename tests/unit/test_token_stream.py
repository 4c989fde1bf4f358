"""The token stream between decode replicas and the ingress, over loopback (no Ray)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from runtime.messages import DecodeChunk
from runtime.token_stream import (
    MAX_FRAME_BYTES,
    TokenBatch,
    TokenInbox,
    TokenPublisher,
    TokenSink,
    encode_frame,
    merged,
)

TOKEN = "cluster-token-" + "x" * 20


async def _connected(sink: TokenSink, token: str = TOKEN) -> TokenPublisher:
    publisher = TokenPublisher(sink.address, token)
    assert not publisher.publish("warmup", 0, (0,))  # starts connecting: not yet
    for _ in range(100):
        await asyncio.sleep(0.01)
        if publisher._writer is not None:
            break
    return publisher


async def _take_all(inbox: TokenInbox, n: int) -> list[int]:
    got: list[int] = []
    while len(got) < n:
        tokens, _, _ = await asyncio.wait_for(inbox.take(), 2.0)
        got.extend(tokens)
    return got


def test_one_frame_per_loop_turn_carries_every_requests_tokens():
    async def run():
        sink = TokenSink(TOKEN)
        await sink.start("127.0.0.1", "127.0.0.1")
        a, b = sink.open("a"), sink.open("b")
        publisher = await _connected(sink)
        frames = []
        original = publisher._writer.write
        publisher._writer.write = lambda data: (frames.append(data), original(data))[1]
        # 1. one "engine step": two requests publish in the same turn of the loop
        assert publisher.publish("a", 0, (1, 2)) and publisher.publish("b", 0, (7,))
        await asyncio.sleep(0)
        assert len(frames) == 1
        # 2. the next step
        publisher.publish("a", 2, (3,))
        assert await _take_all(a, 3) == [1, 2, 3]
        assert await _take_all(b, 1) == [7]
        # 3. tokens of a request the ingress closed are dropped, not kept
        sink.close("a")
        publisher.publish("a", 3, (4,))
        await asyncio.sleep(0.05)
        assert sink.num_open == 1
        await publisher.close()
        await sink.stop()

    asyncio.run(run())


def test_inbox_orders_out_of_order_parts_and_fills_gaps_from_the_final_chunk():
    async def run():
        inbox = TokenInbox()
        inbox.put(2, (30, 40))  # arrived before the part it follows
        inbox.put(0, (10, 20))
        assert await inbox.take() == ((10, 20, 30, 40), (), None)
        inbox.put(2, (30, 40))  # a duplicate: nothing new
        inbox.put(6, (70,))  # a gap at 4..5 (lost with a broken connection)
        final = DecodeChunk((10, 20, 30, 40, 50, 60, 70, 80), "length")
        inbox.finish(final)
        tokens, _, end = await inbox.take()
        assert tokens == (50, 60, 70, 80) and end is final

    asyncio.run(run())


def test_merged_takes_tokens_from_the_serve_call_when_the_stream_is_down():
    async def call():
        yield TokenBatch(0, (1,))
        yield TokenBatch(1, (2, 3))
        yield DecodeChunk((1, 2, 3, 4), "stop")

    async def run():
        out = [item async for item in merged(TokenInbox(), call())]
        assert [t for tokens, _, _ in out for t in tokens] == [1, 2, 3, 4]
        assert out[-1][2].finish_reason == "stop"

    asyncio.run(run())


def test_merged_keeps_each_tokens_logprobs_in_order():
    def lp(token_id):
        return ((token_id, -0.5, chr(token_id)), (token_id + 1, -1.5, None))

    async def call():
        yield TokenBatch(1, (66, 67), (lp(66), lp(67)))  # before the part it follows
        yield TokenBatch(0, (65,), (lp(65),))
        # the final chunk carries every token's: only the ones not yet taken come from it
        yield DecodeChunk((65, 66, 67, 68), "length", logprobs=tuple(map(lp, (65, 66, 67, 68))))

    async def run():
        out = [item async for item in merged(TokenInbox(), call())]
        tokens = [t for ids, _, _ in out for t in ids]
        logprobs = [e for _, entries, _ in out for e in entries]
        assert tokens == [65, 66, 67, 68]
        assert logprobs == [lp(t) for t in tokens]

    asyncio.run(run())


def test_merged_raises_the_calls_error_and_a_call_without_an_end():
    async def failing():
        yield TokenBatch(0, (1,))
        raise RuntimeError("replica died")

    async def endless_end():
        yield TokenBatch(0, (1,))

    async def run(source):
        return [item async for item in merged(TokenInbox(), source)]

    with pytest.raises(RuntimeError, match="replica died"):
        asyncio.run(run(failing()))
    with pytest.raises(RuntimeError, match="without its final chunk"):
        asyncio.run(run(endless_end()))


def test_sink_refuses_a_wrong_token_and_an_oversized_frame():
    async def run():
        sink = TokenSink(TOKEN)
        await sink.start("127.0.0.1", "127.0.0.1")
        inbox = sink.open("r")
        host, port = sink.address.rsplit(":", 1)
        # a wrong token: the sink closes the connection, nothing reaches the inbox
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(encode_frame({"v": 1, "token": "wrong"}))
        writer.write(encode_frame([["r", 0, [1]]]))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 2.0) == b""
        # a frame announcing more than the limit: closed before allocating it
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(encode_frame({"v": 1, "token": TOKEN}))
        writer.write(struct.pack("!I", MAX_FRAME_BYTES + 1))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 2.0) == b""
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(inbox.take(), 0.1)
        await sink.stop()

    asyncio.run(run())


def test_publisher_reports_a_dead_sink_so_the_caller_sends_another_way():
    async def run():
        sink = TokenSink(TOKEN)
        await sink.start("127.0.0.1", "127.0.0.1")
        publisher = await _connected(sink)
        assert publisher.publish("r", 0, (1,))
        await sink.stop()
        publisher._writer.close()  # the connection is gone (as when the ingress dies)
        await asyncio.sleep(0.01)
        assert not publisher.publish("r", 1, (2,))
        await publisher.close()

    asyncio.run(run())
