"""Bulk TCP data channel: KV payload over a plain socket, control over gRPC.

gRPC costs several copies and a thread handoff per message; a plain loopback or LAN socket
moves bytes at close to memory speed. The producer keeps one listener; a pull is authorized
over gRPC (OpenBulk: token, lease and block list checked, a one-time ticket returned), then:
  1. the consumer connects to the data port and sends the 32-byte ticket;
  2. the producer streams frames: header "<IIIQ" (layer, first block, block count, payload
     bytes) + payload gathered from the paged cache into a reused buffer and sent from it;
  3. a frame with zero blocks ends the stream (its payload-bytes field carries the producer's
     wait for blocks still being computed, in microseconds: stream pulls); the consumer
     scatters each payload as it lands in its own reused buffer, so memory stays at one chunk
     per stream.
A ticket is single use and expires after TICKET_TTL_S; the lease reader it holds is returned
when its stream ends, fails, or the ticket expires unused.

The data port is open to anyone who can reach it, so it trusts nothing before a valid ticket:
at most `max_connections` connections are served at once (more are closed on accept), and a
connection must deliver its whole ticket within `ticket_read_s` (one deadline for all of it, so
a client trickling a byte at a time cannot hold a thread). The consumer, in turn, checks every
frame header against the blocks it asked for and its own layout before it allocates or reads
the payload.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kv_transfer.leases import LeaseTable
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.streams import PullSource, StreamFailed
from kv_transfer.transport import TransferError

FRAME = struct.Struct("<IIIQ")
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

    def __init__(self, cache: PagedKVCache, leases: LeaseTable, bind_host: str, *,
                 max_connections: int = MAX_CONNECTIONS,
                 ticket_read_s: float = TICKET_READ_S) -> None:
        assert max_connections >= 1, "max_connections must be at least 1"
        self._cache = cache
        self._leases = leases
        self._listener = socket.create_server((bind_host, 0))
        self._listener.settimeout(0.5)
        self.port: int = self._listener.getsockname()[1]
        self._ticket_read_s = ticket_read_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._conns: set[socket.socket] = set()
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
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        self._thread.join(2)
        self._listener.close()
        with self._lock:
            tickets, self._tickets = list(self._tickets.values()), {}
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv or send
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
            with self._lock:
                self._conns.add(conn)
            try:
                threading.Thread(target=self._serve_slot, args=(conn,), name="kv-bulk-conn",
                                 daemon=True).start()
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
            self._conns.discard(conn)
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
        for plan, blocks in source.chunks(ticket.max_chunk_bytes,
                                          lambda: not self._stopped.is_set()):
            if len(buf) < plan.num_bytes:
                buf = bytearray(plan.num_bytes)
            self._cache.gather_into(plan.layer_index, blocks, buf, 0)
            conn.sendall(FRAME.pack(plan.layer_index, plan.first_block, plan.num_blocks,
                                    plan.num_bytes))
            conn.sendall(memoryview(buf)[: plan.num_bytes])
        if self._stopped.is_set():
            return
        conn.sendall(FRAME.pack(0, 0, 0, int(source.waited_s * 1e6)))


def _recv_exact(conn: socket.socket, num_bytes: int, into: memoryview,
                deadline: float) -> memoryview:
    """num_bytes into the front of `into`, all of them before `deadline` (time.monotonic)."""
    view = into[:num_bytes]
    got = 0
    while got < num_bytes:
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise TransferError(f"data connection passed its deadline after {got} of "
                                f"{num_bytes} bytes")
        conn.settimeout(remaining_s)
        try:
            n = conn.recv_into(view[got:])
        except TimeoutError as err:
            raise TransferError(f"data connection passed its deadline after {got} of "
                                f"{num_bytes} bytes") from err
        if n == 0:
            raise TransferError(f"data connection closed after {got} of {num_bytes} bytes")
        got += n
    return view


def receive_blocks(
    address: tuple[str, int],
    ticket: bytes,
    num_blocks: int,
    deadline: float,
    store: Callable[[int, int, int, memoryview], int],
    should_stop: Callable[[], bool],
    max_chunk_bytes: int,
    producer_wait_s: list[float] | None = None,
    block_bytes_per_layer: Sequence[int] = (),
) -> int:
    """Consumer side: read frames until the end frame; store(layer, first, count, payload)
    writes one chunk and returns its byte count. Returns the bytes stored; the producer's wait
    for blocks being computed (seconds, stream pulls) is appended to producer_wait_s.

    Every frame header is checked before its payload is read: its blocks must lie within the
    num_blocks asked for and, given the consumer's block_bytes_per_layer, its size must be
    exactly its block count times its layer's block bytes. The payload buffer is allocated once
    (max_chunk_bytes, or one block of the widest layer if larger) and never grows on a
    producer's word; a frame that does not fit is refused.
    """
    capacity = max(max_chunk_bytes, *block_bytes_per_layer, 0)
    if capacity > MAX_FRAME_BYTES:
        raise TransferError(f"chunk buffer of {capacity} bytes exceeds the {MAX_FRAME_BYTES} "
                            "byte cap: lower max_chunk_bytes")
    header = memoryview(bytearray(FRAME.size))
    buf = memoryview(bytearray(capacity))
    num_bytes = 0
    timeout = max(0.1, deadline - time.monotonic())
    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(ticket)
        while True:
            layer, first, count, size = FRAME.unpack(
                _recv_exact(conn, FRAME.size, header, deadline)
            )
            if count == 0:
                if producer_wait_s is not None:
                    producer_wait_s.append(size / 1e6)
                return num_bytes
            if should_stop():
                raise TransferError("transfer cancelled: request aborted")
            _check_frame(layer, first, count, size, num_blocks, block_bytes_per_layer,
                         len(buf))
            num_bytes += store(layer, first, count, _recv_exact(conn, size, buf, deadline))


def _check_frame(layer: int, first: int, count: int, size: int, num_blocks: int,
                 block_bytes_per_layer: Sequence[int], capacity: int) -> None:
    where = f"layer {layer}, blocks {first}+{count}, {size} bytes"
    if first + count > num_blocks:
        raise TransferError(f"malformed frame ({where}): only {num_blocks} blocks were asked for")
    if block_bytes_per_layer:
        if layer >= len(block_bytes_per_layer):
            raise TransferError(f"malformed frame ({where}): the consumer has "
                                f"{len(block_bytes_per_layer)} layers")
        expected = count * block_bytes_per_layer[layer]
        if size != expected:
            raise TransferError(
                f"malformed frame ({where}): expected {expected} bytes; producer and consumer "
                "KV layouts differ (model, block size or dtype)"
            )
    if size > capacity:
        raise TransferError(f"malformed frame ({where}): larger than the {capacity} byte chunk "
                            "this consumer asked for")
