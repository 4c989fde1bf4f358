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
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kv_transfer.leases import LeaseTable
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.streams import PullSource, StreamFailed
from kv_transfer.transport import TransferError

FRAME = struct.Struct("<IIIQ")
TICKET_BYTES = 32
TICKET_TTL_S = 10.0


@dataclass(frozen=True)
class _Ticket:
    source: PullSource
    max_chunk_bytes: int
    expires_at: float


class BulkSender:
    """Producer side: one listening socket, one thread per data connection."""

    def __init__(self, cache: PagedKVCache, leases: LeaseTable, bind_host: str) -> None:
        self._cache = cache
        self._leases = leases
        self._listener = socket.create_server((bind_host, 0))
        self._listener.settimeout(0.5)
        self.port: int = self._listener.getsockname()[1]
        self._tickets: dict[bytes, _Ticket] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="kv-bulk", daemon=True)
        self._thread.start()

    def issue(self, source: PullSource, max_chunk_bytes: int) -> bytes:
        """Ticket for a pull whose source reader the caller already acquired (owned now)."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        with self._lock:
            self._tickets[ticket] = _Ticket(source, max_chunk_bytes,
                                            time.monotonic() + TICKET_TTL_S)
        return ticket

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        self._thread.join(2)
        self._listener.close()
        with self._lock:
            tickets, self._tickets = list(self._tickets.values()), {}
        for ticket in tickets:
            ticket.source.finish()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            self._expire_tickets()
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _expire_tickets(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [key for key, ticket in self._tickets.items() if ticket.expires_at < now]
            dropped = [self._tickets.pop(key) for key in expired]
        for ticket in dropped:
            ticket.source.finish()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(TICKET_TTL_S)
            try:
                key = _recv_exact(conn, TICKET_BYTES, memoryview(bytearray(TICKET_BYTES)))
            except (OSError, TransferError):
                return
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


def _recv_exact(conn: socket.socket, num_bytes: int, into: memoryview) -> memoryview:
    view = into[:num_bytes]
    got = 0
    while got < num_bytes:
        n = conn.recv_into(view[got:])
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
) -> int:
    """Consumer side: read frames until the end frame; store(layer, first, count, payload)
    writes one chunk and returns its byte count. Returns the bytes stored; the producer's wait
    for blocks being computed (seconds, stream pulls) is appended to producer_wait_s."""
    header = memoryview(bytearray(FRAME.size))
    buf = memoryview(bytearray(max_chunk_bytes))
    num_bytes = 0
    timeout = max(0.1, deadline - time.monotonic())
    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(ticket)
        while True:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            layer, first, count, size = FRAME.unpack(_recv_exact(conn, FRAME.size, header))
            if count == 0:
                if producer_wait_s is not None:
                    producer_wait_s.append(size / 1e6)
                return num_bytes
            if should_stop():
                raise TransferError("transfer cancelled: request aborted")
            if first + count > num_blocks or size > 1 << 34:
                raise TransferError(f"malformed frame: layer {layer}, blocks {first}+{count}")
            if size > len(buf):
                buf = memoryview(bytearray(size))
            num_bytes += store(layer, first, count, _recv_exact(conn, size, buf))
