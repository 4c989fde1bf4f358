"""The "tcp" data channel: KV payload over a plain socket, authorized over gRPC.

gRPC costs several copies and a thread handoff per message; a plain loopback or LAN socket
moves bytes at close to memory speed. The producer keeps one listener; a pull is authorized
over gRPC (OpenBulk: the control plane checks token, lease and block list; the channel returns
a one-time ticket), then:
  1. the consumer connects to the data port and sends the 32-byte ticket;
  2. the producer streams frames: a chunk header (chunks.pack_frame) + payload gathered from
     the paged cache into a reused buffer and sent from it;
  3. a frame with zero blocks ends the stream, carrying the producer's wait for blocks still
     being computed; the consumer checks each header (its sink) before it reads the payload
     into its own reused buffer, then scatters it, so memory stays at one chunk per stream.
A ticket is single use and expires after TICKET_TTL_S; the lease reader it holds is returned
when its stream ends, fails, or the ticket expires unused.

The data port is open to anyone who can reach it, so it trusts nothing before a valid ticket:
at most `max_connections` connections are served at once (more are closed on accept), and a
connection must deliver its whole ticket within `ticket_read_s` (one deadline for all of it, so
a client trickling a byte at a time cannot hold a thread).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kv_transfer.channels.base import (
    ChannelOptions,
    ChannelRefused,
    ConsumerChannel,
    ControlMethod,
    ProducerChannel,
    PullMethod,
    ServedPull,
    remaining_s,
)
from kv_transfer.chunks import FRAME, pack_end_frame, pack_frame, unpack_frame
from kv_transfer.control import method_path
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.sink import ChunkSink
from kv_transfer.streams import PullSource, StreamFailed
from kv_transfer.transport import TransferError
from protos import kv_transfer_pb2 as pb

OPEN_BULK_METHOD = method_path("OpenBulk")
TICKET_BYTES = 32
TICKET_TTL_S = 10.0
TICKET_READ_S = 5.0  # a consumer sends its ticket right after connecting
MAX_CONNECTIONS = 32
MAX_FRAME_BYTES = 1 << 30  # no layout or chunk setting justifies a larger frame


@dataclass(frozen=True)
class _Ticket:
    source: PullSource
    max_chunk_bytes: int
    expires_at: float


class BulkSender:
    """Producer side: one listening socket, one thread per data connection, at most
    max_connections of them; a connection is closed unless its ticket arrives whole within
    ticket_read_s."""

    def __init__(self, cache: PagedKVCache, bind_host: str, *,
                 max_connections: int = MAX_CONNECTIONS,
                 ticket_read_s: float = TICKET_READ_S) -> None:
        assert max_connections >= 1, "max_connections must be at least 1"
        self._cache = cache
        self._listener = socket.create_server((bind_host, 0))
        self._listener.settimeout(0.5)
        self.port: int = self._listener.getsockname()[1]
        self._ticket_read_s = ticket_read_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._tickets: dict[bytes, _Ticket] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.num_refused = 0  # connections closed on accept because all slots were taken
        self._thread = threading.Thread(target=self._accept_loop, name="kv-bulk", daemon=True)
        self._thread.start()

    def issue(self, source: PullSource, max_chunk_bytes: int) -> bytes:
        """Ticket for a pull whose source reader the caller already acquired (owned now)."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        with self._lock:
            self._tickets[ticket] = _Ticket(source, max_chunk_bytes,
                                            time.monotonic() + TICKET_TTL_S)
        return ticket

    @property
    def num_connections(self) -> int:
        """Data connections being served now (reading a ticket or sending blocks)."""
        with self._lock:
            return len(self._conns)

    @property
    def num_tickets(self) -> int:
        """Tickets issued and not yet used or expired."""
        with self._lock:
            return len(self._tickets)

    def stop(self) -> None:
        """Close the port and every connection, return every unused ticket's reader, and
        join every thread (idempotent)."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        self._thread.join(2)
        self._listener.close()
        with self._lock:
            tickets, self._tickets = list(self._tickets.values()), {}
            conns = dict(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv or send
        for thread in conns.values():
            thread.join(2)
        for ticket in tickets:
            ticket.source.finish()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            self._expire_tickets()
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            if not self._slots.acquire(blocking=False):
                self.num_refused += 1
                conn.close()  # every slot taken: refuse rather than queue behind a stalled peer
                continue
            thread = threading.Thread(target=self._serve_slot, args=(conn,),
                                      name="kv-bulk-conn", daemon=True)
            with self._lock:
                self._conns[conn] = thread
            try:
                thread.start()
            except RuntimeError:  # no thread to be had: drop this connection, keep serving
                self._close_slot(conn)
                conn.close()

    def _expire_tickets(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [key for key, ticket in self._tickets.items() if ticket.expires_at < now]
            dropped = [self._tickets.pop(key) for key in expired]
        for ticket in dropped:
            ticket.source.finish()

    def _serve_slot(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        finally:
            self._close_slot(conn)

    def _close_slot(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.pop(conn, None)
        self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            deadline = time.monotonic() + self._ticket_read_s
            try:
                key = _recv_exact(conn, TICKET_BYTES, memoryview(bytearray(TICKET_BYTES)),
                                  deadline)
            except (OSError, TransferError):
                return
            conn.settimeout(TICKET_TTL_S)  # per send: a consumer that stops reading is dropped
            with self._lock:
                ticket = self._tickets.pop(bytes(key), None)
            if ticket is None:
                return  # unknown or reused ticket: drop the connection
            try:
                self._send_blocks(conn, ticket)
            except (OSError, StreamFailed):
                pass  # consumer went away, or the stream failed: the consumer sees no end frame
            finally:
                ticket.source.finish()

    def _send_blocks(self, conn: socket.socket, ticket: _Ticket) -> None:
        buf = bytearray()
        source = ticket.source
        for header, blocks in source.chunks(ticket.max_chunk_bytes,
                                            lambda: not self._stopped.is_set()):
            if len(buf) < header.num_bytes:
                buf = bytearray(header.num_bytes)
            self._cache.gather_into(header.layer_index, blocks, buf, 0)
            conn.sendall(pack_frame(header))
            conn.sendall(memoryview(buf)[: header.num_bytes])
        if self._stopped.is_set():
            return
        conn.sendall(pack_end_frame(source.waited_s))


def _recv_exact(conn: socket.socket, num_bytes: int, into: memoryview,
                deadline: float) -> memoryview:
    """num_bytes into the front of `into`, all of them before `deadline` (time.monotonic)."""
    view = into[:num_bytes]
    got = 0
    while got < num_bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransferError(f"data connection passed its deadline after {got} of "
                                f"{num_bytes} bytes")
        conn.settimeout(remaining)
        try:
            n = conn.recv_into(view[got:])
        except TimeoutError as err:
            raise TransferError(f"data connection passed its deadline after {got} of "
                                f"{num_bytes} bytes") from err
        if n == 0:
            raise TransferError(f"data connection closed after {got} of {num_bytes} bytes")
        got += n
    return view


def receive_blocks(address: tuple[str, int], ticket: bytes, sink: ChunkSink, deadline: float,
                   should_stop: Callable[[], bool], max_chunk_bytes: int) -> None:
    """Consumer side: read frames into the sink until the end frame (whose wait goes to
    `sink.finish`).

    Every frame header is checked by the sink before its payload is read. The payload buffer
    is allocated once (max_chunk_bytes, or one block of the widest layer if larger) and never
    grows on a producer's word; a frame that does not fit is refused.
    """
    capacity = max(max_chunk_bytes, *sink.block_bytes_per_layer)
    if capacity > MAX_FRAME_BYTES:
        raise TransferError(f"chunk buffer of {capacity} bytes exceeds the {MAX_FRAME_BYTES} "
                            "byte cap: lower max_chunk_bytes")
    frame = memoryview(bytearray(FRAME.size))
    buf = memoryview(bytearray(capacity))
    with socket.create_connection(address, timeout=remaining_s(deadline)) as conn:
        conn.sendall(ticket)
        while True:
            header = unpack_frame(_recv_exact(conn, FRAME.size, frame, deadline))
            if isinstance(header, float):
                sink.finish(producer_wait_s=header)
                return
            if should_stop():
                raise TransferError("transfer cancelled: request aborted")
            sink.check(header, capacity, wire="frame")
            sink.write(header, _recv_exact(conn, header.num_bytes, buf, deadline))


class BulkTcpProducer(ProducerChannel):
    """Serves OpenBulk and the data port it issues tickets for."""

    def __init__(self, cache: PagedKVCache, options: ChannelOptions) -> None:
        super().__init__(cache, options)
        self.sender: BulkSender | None = None

    def methods(self) -> Sequence[PullMethod | ControlMethod]:
        return [PullMethod("OpenBulk", self._open, pb.PullRequest.FromString,
                           pb.BulkTicket.SerializeToString, streaming=False)]

    def start(self, bind_host: str) -> None:
        self.sender = BulkSender(self.cache, bind_host)

    def stop(self) -> None:
        if self.sender is not None:
            self.sender.stop()
            self.sender = None

    @property
    def num_tickets(self) -> int:
        return self.sender.num_tickets if self.sender is not None else 0

    def _open(self, pull: ServedPull) -> pb.BulkTicket:
        if self.sender is None:
            pull.source.finish()
            raise ChannelRefused("the bulk data port is closed")
        ticket = self.sender.issue(pull.source, pull.chunk_bytes)
        return pb.BulkTicket(port=self.sender.port, ticket=ticket)


class BulkTcpConsumer(ConsumerChannel):
    """Calls OpenBulk on the part's connection, then reads the frames from the data port."""

    def receive(self, endpoint: str, request: pb.PullRequest, sink: ChunkSink,
                stream_index: int, deadline: float, should_stop: Callable[[], bool]) -> None:
        open_bulk = self.control.unary(endpoint, OPEN_BULK_METHOD, pb.BulkTicket.FromString,
                                       stream_index)
        ticket = open_bulk(request, timeout=remaining_s(deadline), metadata=self.control.metadata)
        address = (endpoint.rsplit(":", 1)[0], ticket.port)
        receive_blocks(address, ticket.ticket, sink, deadline, should_stop,
                       request.max_chunk_bytes)

