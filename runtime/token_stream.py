"""The token stream: decode replicas send generated tokens to the ingress over one TCP
connection per (replica, ingress), every request's tokens of an engine step in one frame.

A Ray streaming call costs CPU per message on both ends (serialization, the core worker's
report and receive paths) whatever it carries; one message per request per step made the
front-end cost more CPU per token than the engines that produce the tokens. vLLM's own API
server gets one ZMQ message per engine step for all requests; this is the same shape.

Lifecycle of one decode:
  1. The ingress opens a `TokenInbox` for the request in its `TokenSink` and calls the decode
     replica through Serve as before, naming the sink's address.
  2. The replica's `TokenPublisher` for that address queues each output's new tokens with their
     start index, and writes everything queued as one frame once the step's outputs are all
     handed out (`call_soon`): one write per step for all requests, not one per token.
  3. The Serve call's last item is the final chunk, carrying every token of the request and
     the timings: it is authoritative. Tokens the stream lost (a broken connection) are filled
     from it; tokens it already delivered are not repeated. While the connection is down,
     tokens go over the Serve call (`TokenBatch`), so a request always streams.
Frames: a 4-byte big-endian length, then msgpack: the first frame of a connection is
`{"v": VERSION, "token": <cluster token>}` (a wrong token or version closes the connection),
every later one a list of `[request_id, start, [token ids]]`. Frame sizes are checked before
anything is allocated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgpack

from runtime.logprobs import TokenLogprobs

logger = logging.getLogger(__name__)

VERSION = 1
MAX_FRAME_BYTES = 8 << 20
MAX_WRITE_BUFFER_BYTES = 16 << 20  # a reader this far behind is cut off (tokens go over Ray)
RECONNECT_AFTER_S = 1.0
_HEADER = struct.Struct("!I")


@dataclass(frozen=True)
class TokenBatch:
    """Tokens start .. start + len(token_ids) of one decode stream, sent over the Serve call
    (the token stream is down or not used)."""

    start: int
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, if the request asked
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None  # the prompt's, if asked


def encode_frame(payload: Any) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"token stream frame of {size} bytes > {MAX_FRAME_BYTES}")
    return msgpack.unpackb(await reader.readexactly(size), raw=False)


async def listen(handler: Any, bind_host: str,
                 advertise_host: str) -> tuple[asyncio.Server, str]:
    """A TCP server on a free port of bind_host, and the host:port peers dial."""
    server = await asyncio.start_server(handler, bind_host, 0)
    return server, f"{advertise_host}:{server.sockets[0].getsockname()[1]}"


def hello_ok(hello: Any, auth_token: bytes) -> bool:
    """A connection's first frame names this protocol version and the cluster token."""
    return isinstance(hello, dict) and hello.get("v") == VERSION and hmac.compare_digest(
        str(hello.get("token", "")).encode(), auth_token)


class TokenInbox:
    """One request's tokens, reassembled in order from the stream and the Serve call."""

    def __init__(self) -> None:
        # start -> (token ids, their logprobs: () when the request asked for none)
        self._parts: dict[int, tuple[tuple[int, ...], tuple[TokenLogprobs, ...]]] = {}
        self._next = 0
        self._ready = asyncio.Event()
        self._final: Any = None  # the final chunk (its token_ids: every token)
        self._error: BaseException | None = None
        # the prompt's logprobs (echo with logprobs), once they came over the call
        self.prompt_logprobs: tuple[TokenLogprobs, ...] | None = None

    def put(self, start: int, token_ids: tuple[int, ...],
            logprobs: tuple[TokenLogprobs, ...] = (),
            prompt_logprobs: tuple[TokenLogprobs, ...] | None = None) -> None:
        if prompt_logprobs is not None:
            self.prompt_logprobs = prompt_logprobs
        if start + len(token_ids) > self._next:
            self._parts[start] = (token_ids, logprobs)
            self._ready.set()

    def finish(self, final: Any) -> None:
        self._final = final
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def take(self) -> tuple[tuple[int, ...], tuple[TokenLogprobs, ...], Any]:
        """(the next tokens in order, their logprobs if any, the final chunk once every
        token is out, else None)."""
        while True:
            if self._final is not None:
                rest = tuple(self._final.token_ids[self._next:])
                rest_logprobs = tuple(self._final.logprobs[self._next:])
                self._next += len(rest)
                return rest, rest_logprobs, self._final
            if self._error is not None:
                raise self._error
            out: list[int] = []
            out_logprobs: list[TokenLogprobs] = []
            while self._parts:
                start = min(self._parts)
                if start > self._next:
                    break
                ids, logprobs = self._parts.pop(start)
                out.extend(ids[self._next - start:])
                out_logprobs.extend(logprobs[self._next - start:])
                self._next = max(self._next, start + len(ids))
            if out:
                return tuple(out), tuple(out_logprobs), None
            self._ready.clear()
            await self._ready.wait()


class TokenSink:
    """The ingress's end: accepts replicas' connections, routes tokens to open inboxes."""

    def __init__(self, auth_token: str) -> None:
        self._auth_token = auth_token.encode()
        self._inboxes: dict[str, TokenInbox] = {}
        self._server: asyncio.Server | None = None
        self.address = ""

    async def start(self, bind_host: str, advertise_host: str) -> str:
        self._server, self.address = await listen(self._serve, bind_host, advertise_host)
        return self.address

    def open(self, request_id: str) -> TokenInbox:
        inbox = self._inboxes[request_id] = TokenInbox()
        return inbox

    def close(self, request_id: str) -> None:
        self._inboxes.pop(request_id, None)

    @property
    def num_open(self) -> int:
        return len(self._inboxes)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(read_frame(reader), 10.0)
            if not hello_ok(hello, self._auth_token):
                logger.warning("token stream: refused a connection (wrong token or version)")
                return
            while True:
                for request_id, start, token_ids in await read_frame(reader):
                    inbox = self._inboxes.get(request_id)
                    if inbox is not None:  # else the request is gone: drop its tokens
                        inbox.put(start, tuple(token_ids))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except (ValueError, TypeError, msgpack.UnpackException) as err:
            logger.warning("token stream: bad frame, connection closed: %s", err)
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class TokenPublisher:
    """A replica's end for one sink address: batches what the replica's requests publish
    within one turn of the event loop into one frame."""

    def __init__(self, address: str, auth_token: str) -> None:
        self.address = address
        self._auth_token = auth_token
        self._writer: asyncio.StreamWriter | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._pending: list[list[Any]] = []

    def publish(self, request_id: str, start: int, token_ids: tuple[int, ...]) -> bool:
        """Queue tokens for the next frame; False if the stream is down (send them another
        way)."""
        writer = self._writer
        if writer is None or writer.is_closing():
            self._writer = None
            self._connect_soon()
            return False
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append([request_id, start, list(token_ids)])
        return True

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        writer = self._writer
        if writer is None or not pending:
            return
        transport = writer.transport
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER_BYTES:
            logger.warning("token stream to %s: reader too far behind, reconnecting",
                           self.address)
            writer.close()
            self._writer = None
            return
        writer.write(encode_frame(pending))

    def _connect_soon(self) -> None:
        loop = asyncio.get_running_loop()
        if self._connecting is not None or loop.time() < self._retry_at:
            return
        self._connecting = loop.create_task(self._connect())

    async def _connect(self) -> None:
        host, _, port = self.address.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5.0)
            writer.write(encode_frame({"v": VERSION, "token": self._auth_token}))
            await writer.drain()
            self._writer = writer
        except (OSError, asyncio.TimeoutError) as err:
            logger.warning("token stream to %s: cannot connect (%s); tokens go over Ray",
                           self.address, err)
            self._retry_at = asyncio.get_running_loop().time() + RECONNECT_AFTER_S
        finally:
            self._connecting = None

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()


async def merged(inbox: TokenInbox, calls: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Feed a Serve call's items (TokenBatch, then the final chunk) into the inbox and yield
    (tokens, logprobs, final) in order until the final one; closing this closes the call."""

    async def pump() -> None:
        try:
            async for item in calls:
                if isinstance(item, TokenBatch):
                    inbox.put(item.start, item.token_ids, item.logprobs, item.prompt_logprobs)
                else:
                    inbox.finish(item)
        except Exception as err:  # noqa: BLE001 - raised to the consumer by the inbox
            inbox.fail(err)
        else:
            inbox.fail(RuntimeError("the decode call ended without its final chunk"))

    task = asyncio.ensure_future(pump())
    try:
        while True:
            tokens, logprobs, final = await inbox.take()
            yield tokens, logprobs, final
            if final is not None:
                return
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
