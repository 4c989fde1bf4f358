"""Direct calls from the ingress to pool replicas, over loopback (no Ray, no engine)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest

from runtime.clients import is_replica_failure
from runtime.direct_calls import (
    MAX_FRAME_BYTES,
    CallClient,
    CallServer,
    DirectCalls,
    RemoteCallError,
    ReplicaConnectionLost,
    ReplicaDraining,
)
from runtime.messages import KVTransferFailed
from runtime.token_stream import encode_frame, read_frame

TOKEN = "cluster-token-" + "y" * 20


class EngineDeadError(RuntimeError):
    """Stands for vLLM's: a class the ingress cannot import (defined in a test module)."""


class Replica:
    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.release = asyncio.Event()

    async def prefill(self, prompt: list[int], stream_handle: str = "") -> dict[str, object]:
        return {"first": prompt[-1] + 1, "handle": stream_handle}

    async def decode(self, n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                yield i
                await asyncio.sleep(0)
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append("decode")
            raise

    async def slow(self) -> None:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append("slow")
            raise

    async def transfer_failed(self) -> None:
        raise KVTransferFailed("blocks gone")

    async def dead(self) -> None:
        raise EngineDeadError("engine core died")

    async def secret(self) -> None:  # not in the allowed methods
        raise AssertionError("must not run")


METHODS = frozenset({"prefill", "decode", "slow", "transfer_failed", "dead"})


async def _setup() -> tuple[Replica, CallServer, CallClient]:
    replica = Replica()
    server = CallServer(replica, METHODS, TOKEN)
    await server.start("127.0.0.1", "127.0.0.1")
    client = await CallClient.connect(server.address, TOKEN)
    return replica, server, client


async def _until(predicate, timeout_s: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_unary_and_streaming_calls_return_what_the_replica_returns() -> None:
    async def main() -> None:
        replica, server, client = await _setup()
        assert await client.call("prefill", [1, 2, 3], stream_handle="h") == \
            {"first": 4, "handle": "h"}
        replica.release.set()
        assert [i async for i in client.stream("decode", 5)] == [0, 1, 2, 3, 4]
        # many calls at once share the one connection
        results = await asyncio.gather(*(client.call("prefill", [i]) for i in range(50)))
        assert [r["first"] for r in results] == list(range(1, 51))
        assert server.num_running == 0
        await client.close()
        await server.close(0)

    asyncio.run(main())


def test_errors_cross_as_their_class_or_by_name() -> None:
    async def main() -> None:
        _, server, client = await _setup()
        with pytest.raises(KVTransferFailed, match="blocks gone"):
            await client.call("transfer_failed")
        with pytest.raises(RemoteCallError) as info:
            await client.call("dead")
        assert info.value.class_names[0] == "EngineDeadError"
        assert is_replica_failure(info.value)
        assert not is_replica_failure(KVTransferFailed("x"))
        with pytest.raises(ValueError, match="no direct call 'secret'"):
            await client.call("secret")
        await client.close()
        await server.close(0)

    asyncio.run(main())


def test_a_caller_that_gives_up_cancels_the_call_on_the_replica() -> None:
    async def main() -> None:
        replica, server, client = await _setup()
        call = asyncio.ensure_future(client.call("slow"))
        await _until(lambda: server.num_running == 1)
        call.cancel()
        await _until(lambda: replica.cancelled == ["slow"])
        # a stream read partly, then closed
        stream = client.stream("decode", 3)
        assert await anext(stream) == 0
        await stream.aclose()
        await _until(lambda: "decode" in replica.cancelled)
        await _until(lambda: server.num_running == 0)
        await client.close()
        await server.close(0)

    asyncio.run(main())


def test_a_lost_connection_fails_the_calls_on_it_and_cancels_them_on_the_replica() -> None:
    async def main() -> None:
        replica, server, client = await _setup()
        call = asyncio.ensure_future(client.call("slow"))
        stream = client.stream("decode", 1)
        assert await anext(stream) == 0
        await _until(lambda: server.num_running == 2)
        client._writer.transport.abort()  # the replica's end sees the connection drop
        with pytest.raises(ReplicaConnectionLost):
            await call
        with pytest.raises(ReplicaConnectionLost):
            await anext(stream)
        assert is_replica_failure(ReplicaConnectionLost("x"))
        await _until(lambda: sorted(replica.cancelled) == ["decode", "slow"])
        assert not client.is_open
        with pytest.raises(ReplicaConnectionLost):
            await client.call("prefill", [1])
        await server.close(0)

    asyncio.run(main())


def test_draining_refuses_new_calls_and_waits_for_running_ones() -> None:
    async def main() -> None:
        replica, server, client = await _setup()
        running = asyncio.ensure_future(client.call("slow"))
        await _until(lambda: server.num_running == 1)
        closing = asyncio.ensure_future(server.close(5.0))
        await asyncio.sleep(0.05)
        with pytest.raises(ReplicaDraining) as info:
            await client.call("prefill", [1])
        assert is_replica_failure(info.value)  # the ingress retries it elsewhere
        assert not closing.done()  # still waiting for the running call
        replica.release.set()
        assert await running is None
        await asyncio.wait_for(closing, 2.0)
        await client.close()

        # a grace period that runs out: close returns anyway
        replica2, server2, client2 = await _setup()
        stuck = asyncio.ensure_future(client2.call("slow"))
        await _until(lambda: server2.num_running == 1)
        await asyncio.wait_for(server2.close(0.1), 2.0)
        stuck.cancel()
        await client2.close()

    asyncio.run(main())


def test_a_wrong_token_or_an_oversized_frame_is_refused() -> None:
    async def main() -> None:
        _, server, _ = await _setup()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await CallClient.connect(server.address, "wrong-token")
        # authenticated, then a frame announcing more than the limit: closed unread
        host, _, port = server.address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(encode_frame({"v": 1, "token": TOKEN}))
        assert await read_frame(reader) == {"ok": True}
        writer.write(struct.pack("!I", MAX_FRAME_BYTES + 1))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 2.0) == b""
        writer.close()
        await server.close(0)

    asyncio.run(main())


def test_the_registry_connects_in_the_background_and_follows_address_changes() -> None:
    async def main() -> None:
        _, server, _ = await _setup()
        registry = DirectCalls(TOKEN)
        assert registry.client("r1") is None  # no address yet
        registry.update("r1", server.address)
        assert registry.client("r1") is None  # connecting: the caller uses Serve meanwhile
        await _until(lambda: registry.client("r1") is not None)
        client = registry.client("r1")
        assert client is not None and await client.call("prefill", [7]) == \
            {"first": 8, "handle": ""}
        registry.update("r1", "")  # the replica stopped reporting an address
        assert registry.client("r1") is None
        await _until(lambda: not client.is_open)
        # an address nobody listens on: no client, retried no sooner than a second later
        registry.update("r2", "127.0.0.1:1")
        assert registry.client("r2") is None
        await asyncio.sleep(0.2)
        assert registry.client("r2") is None and registry.num_connected == 0
        await server.close(0)

    asyncio.run(main())
