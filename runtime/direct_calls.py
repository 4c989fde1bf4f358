"""Direct calls: the ingress calls a pool replica's request methods over one TCP connection
per replica instead of through a Serve handle.

A Serve handle call costs about 8 ms here (two cores): Serve's router and request metadata,
then a Ray actor call into an async actor (about 4 ms on its own); a prefill-then-decode
request makes two. A direct call is one frame each way on a connection that is already open.
Serve stays in charge of everything else: replicas, health checks, autoscaling, status calls;
and a request whose replica has no direct connection up goes through the Serve handle as
before, so a request never waits for a connection.

Lifecycle:
  1. Each pool replica runs a `CallServer` and puts its address in the load reports it sends
     the ingress every 0.4 s; the ingress's `DirectCalls` registry connects to it in the
     background.
  2. A call is a frame `("call", id, method, args, kwargs)`; the replica runs the method in a
     task and answers `("ok", id, value)`, or, for an async generator, one `("item", id, v)`
     per item then `("end", id, None)`; `("err", id, error)` if it raised. A caller that gives
     up sends `("cancel", id)`: the task is cancelled as Serve would cancel it (the engine
     aborts the request).
  3. A lost connection fails every call on it with `ReplicaConnectionLost`, which the ingress
     treats as the replica failing (a request with no token sent yet is retried elsewhere);
     the replica cancels the calls the connection carried.
  4. On graceful shutdown (Serve removing the replica) the server refuses new calls (the
     ingress retries them on another replica) and waits for the running ones.
Frames: a 4-byte big-endian length, then the body. The first frame each way is msgpack (the
ingress's `{"v": VERSION, "token": <cluster token>}`, the replica's `{"ok": true}`); nothing
is unpickled before the token matched. Later frames are pickles (the same trust as a Ray
call: a cluster member holding the token). Frame sizes are checked before anything is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
import pickle
import struct
from collections.abc import AsyncIterator
from typing import Any

from runtime.token_stream import VERSION, encode_frame, hello_ok, listen, read_frame

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES = 64 << 20
MAX_WRITE_BUFFER_BYTES = 64 << 20  # a peer this far behind is cut off
CONNECT_TIMEOUT_S = 5.0
RECONNECT_AFTER_S = 1.0
_HEADER = struct.Struct("!I")
_END = object()
# exceptions that cross as themselves (their classes import without vLLM); others cross as
# RemoteCallError carrying their class names
_PORTABLE_PACKAGES = ("builtins", "asyncio", "runtime", "kv_transfer")


class ReplicaConnectionLost(ConnectionError):
    """The direct connection to a replica broke with calls on it (the replica died, or it is
    shutting down)."""


class ReplicaDraining(RuntimeError):
    """The replica is shutting down and takes no new calls."""


class RemoteCallError(RuntimeError):
    """A replica's exception whose class the ingress does not import (e.g. vLLM's
    EngineDeadError): its class names, most derived first, and its message."""

    def __init__(self, class_names: tuple[str, ...], message: str) -> None:
        super().__init__(f"{class_names[0] if class_names else 'Error'}: {message}")
        self.class_names = class_names
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return RemoteCallError, (self.class_names, self.message)


def _pack(payload: Any) -> bytes:
    body = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def _unpack(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"direct call frame of {size} bytes > {MAX_FRAME_BYTES}")
    return pickle.loads(await reader.readexactly(size))


def _portable(err: BaseException) -> Any:
    """What crosses the connection for a raised exception."""
    if type(err).__module__.split(".")[0] in _PORTABLE_PACKAGES:
        try:
            pickle.loads(pickle.dumps(err))
            return err
        except Exception:  # noqa: BLE001 - an exception that does not pickle: names only
            pass
    return RemoteCallError(tuple(cls.__name__ for cls in type(err).__mro__), str(err))


def _send(writer: asyncio.StreamWriter, payload: Any) -> None:
    if writer.is_closing():
        return
    if writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER_BYTES:
        logger.warning("direct calls: peer too far behind, connection closed")
        writer.close()
        return
    writer.write(_pack(payload))


class CallServer:
    """A replica's end: runs `methods` of `target` for the ingress."""

    def __init__(self, target: object, methods: frozenset[str], auth_token: str) -> None:
        self._target = target
        self._methods = methods
        self._auth_token = auth_token.encode()
        self._server: asyncio.Server | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self.address = ""

    async def start(self, bind_host: str, advertise_host: str) -> str:
        self._server, self.address = await listen(self._serve, bind_host, advertise_host)
        return self.address

    @property
    def num_running(self) -> int:
        return len(self._running)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        calls: dict[int, asyncio.Task[None]] = {}
        try:
            hello = await asyncio.wait_for(read_frame(reader), CONNECT_TIMEOUT_S)
            if not hello_ok(hello, self._auth_token):
                logger.warning("direct calls: refused a connection (wrong token or version)")
                return
            writer.write(encode_frame({"ok": True}))
            while True:
                frame = await _unpack(reader)
                if frame[0] == "cancel":
                    task = calls.get(frame[1])
                    if task is not None:
                        task.cancel()
                    continue
                _, call_id, method, args, kwargs = frame
                task = asyncio.ensure_future(self._run(writer, call_id, method, args, kwargs))
                calls[call_id] = task
                self._running.add(task)
                self._idle.clear()
                task.add_done_callback(functools.partial(self._done, calls, call_id))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except (ValueError, TypeError, IndexError, pickle.UnpicklingError) as err:
            logger.warning("direct calls: bad frame, connection closed: %s", err)
        finally:
            for task in list(calls.values()):  # the caller is gone: so are its calls
                task.cancel()
            writer.close()

    def _done(self, calls: dict[int, asyncio.Task[None]], call_id: int,
              task: asyncio.Task[None]) -> None:
        calls.pop(call_id, None)
        self._running.discard(task)
        if not self._running:
            self._idle.set()

    async def _run(self, writer: asyncio.StreamWriter, call_id: int, method: str,
                   args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            if self._draining:
                raise ReplicaDraining("the replica is shutting down")
            if method not in self._methods:
                raise ValueError(f"no direct call {method!r}")
            result = getattr(self._target, method)(*args, **kwargs)
            if inspect.isasyncgen(result):
                async for item in result:
                    _send(writer, ("item", call_id, item))
                _send(writer, ("end", call_id, None))
            else:
                _send(writer, ("ok", call_id, await result))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - raised again on the caller's side
            _send(writer, ("err", call_id, _portable(err)))

    async def close(self, grace_s: float) -> None:
        """Take no new calls; wait up to grace_s for the running ones, then stop listening."""
        self._draining = True
        if self._running:
            logger.info("direct calls: draining %d call(s), up to %.0f s", len(self._running),
                        grace_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        if self._server is not None:
            self._server.close()


class CallClient:
    """The ingress's end of one replica's connection; calls are multiplexed on it."""

    def __init__(self, address: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.address = address
        self._writer = writer
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[Any] | asyncio.Queue[Any]] = {}
        self._reader_task = asyncio.ensure_future(self._read(reader))

    @classmethod
    async def connect(cls, address: str, auth_token: str) -> CallClient:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)),
                                                CONNECT_TIMEOUT_S)
        try:
            writer.write(encode_frame({"v": VERSION, "token": auth_token}))
            reply = await asyncio.wait_for(read_frame(reader), CONNECT_TIMEOUT_S)
            if not (isinstance(reply, dict) and reply.get("ok")):
                raise ConnectionError(f"replica {address} refused the direct connection")
        except BaseException:
            writer.close()
            raise
        return cls(address, reader, writer)

    @property
    def is_open(self) -> bool:
        return not self._reader_task.done()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        error: BaseException = ReplicaConnectionLost(
            f"the connection to replica {self.address} was lost")
        try:
            while True:
                kind, call_id, value = await _unpack(reader)
                waiter = self._waiting.get(call_id)
                if isinstance(waiter, asyncio.Queue):
                    waiter.put_nowait(value if kind == "item" else
                                      _END if kind == "end" else _Raise(value))
                elif waiter is not None and not waiter.done():
                    if kind == "ok":
                        waiter.set_result(value)
                    else:
                        waiter.set_exception(value)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as err:  # noqa: BLE001 - a frame that does not decode ends it
            logger.warning("direct calls to %s: bad frame, connection closed: %s",
                           self.address, err)
        finally:
            self._writer.close()
            for waiter in self._waiting.values():
                if isinstance(waiter, asyncio.Queue):
                    waiter.put_nowait(_Raise(error))
                elif not waiter.done():
                    waiter.set_exception(error)

    def _start(self, waiter: asyncio.Future[Any] | asyncio.Queue[Any], method: str,
               args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        if not self.is_open:
            raise ReplicaConnectionLost(f"the connection to replica {self.address} is closed")
        call_id = next(self._ids)
        self._waiting[call_id] = waiter
        _send(self._writer, ("call", call_id, method, args, kwargs))
        return call_id

    def _finish(self, call_id: int, cancel: bool) -> None:
        self._waiting.pop(call_id, None)
        if cancel and self.is_open:
            _send(self._writer, ("cancel", call_id, None))

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        call_id = self._start(future, method, args, kwargs)
        try:
            return await future
        except asyncio.CancelledError:
            self._finish(call_id, cancel=True)
            raise
        finally:
            self._finish(call_id, cancel=False)

    async def stream(self, method: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        call_id = self._start(queue, method, args, kwargs)
        ended = False
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, _Raise):
                    ended = True
                    raise item.error
                yield item
            ended = True
        finally:
            self._finish(call_id, cancel=not ended)

    async def close(self) -> None:
        self._writer.close()
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task


class _Raise:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class DirectCalls:
    """The ingress's registry: replica id -> its call server's address (from its reports)
    and a connection, opened in the background. `client` never waits: no open connection
    means the caller uses the Serve handle."""

    def __init__(self, auth_token: str) -> None:
        self._auth_token = auth_token
        self._addresses: dict[str, str] = {}
        self._clients: dict[str, CallClient] = {}
        self._connecting: dict[str, asyncio.Task[None]] = {}
        self._retry_at: dict[str, float] = {}
        self.num_calls = {"direct": 0, "serve": 0}  # by the path they took
        self.num_load_reads = 0  # load reports read over the connections (Ingress)

    def update(self, replica_id: str, address: str) -> None:
        if self._addresses.get(replica_id) == address:
            return
        self.forget(replica_id)
        if address:
            self._addresses[replica_id] = address

    def forget(self, replica_id: str) -> None:
        self._addresses.pop(replica_id, None)
        client = self._clients.pop(replica_id, None)
        if client is not None:
            asyncio.ensure_future(client.close())

    def client(self, replica_id: str) -> CallClient | None:
        client = self._clients.get(replica_id)
        if client is not None and client.is_open:
            self.num_calls["direct"] += 1
            return client
        self.num_calls["serve"] += 1
        address = self._addresses.get(replica_id)
        loop = asyncio.get_running_loop()
        if address and replica_id not in self._connecting \
                and loop.time() >= self._retry_at.get(replica_id, 0.0):
            self._connecting[replica_id] = loop.create_task(self._connect(replica_id, address))
        return None

    async def _connect(self, replica_id: str, address: str) -> None:
        try:
            client = await CallClient.connect(address, self._auth_token)
            if self._addresses.get(replica_id) == address:
                self._clients[replica_id] = client
            else:
                await client.close()
        except (OSError, asyncio.TimeoutError) as err:
            logger.warning("direct calls to %s: cannot connect (%s); calls go through Serve",
                           address, err)
            self._retry_at[replica_id] = asyncio.get_running_loop().time() + RECONNECT_AFTER_S
        finally:
            self._connecting.pop(replica_id, None)

    def open_clients(self) -> dict[str, CallClient]:
        """The replicas with an open connection (no connection is started, no call counted)."""
        return {rid: client for rid, client in self._clients.items() if client.is_open}

    @property
    def num_connected(self) -> int:
        return sum(client.is_open for client in self._clients.values())

    def snapshot(self) -> dict[str, object]:
        return {"connected": self.num_connected, "replicas": dict(self._addresses),
                "calls": dict(self.num_calls), "load_reads": self.num_load_reads}
