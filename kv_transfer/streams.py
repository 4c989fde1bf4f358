"""Producer-side streams: a prompt's KV blocks served layer by layer while it is prefilled.

Lifecycle of a stream (one per prefill request whose kv_transfer_params carry a stream handle):
  1. Each step that computes part of the prompt, the scheduler side tells the worker the
     request's block ids and how many prompt tokens will be computed when the step ends
     (`advance`, before the forward pass).
  2. The attention layers call the connector's `save_kv_layer` once they have written a layer:
     `mark_layer` makes that layer of the step's tokens readable; `mark_all` (from
     `wait_for_save`, the end of the step) covers any layer the hook did not name.
  3. A consumer's prefetch opens a reader by handle (`open_reader`) and reads chunks in the
     order they become ready, waiting (bounded) for those not computed yet. Only whole blocks
     are served, and the prompt's last, partial block once the whole prompt is computed.
  4. The request ends. Handed off: every block is ready and now held under the lease; the
     stream stays readable until its lease ends (`drop_requests`). Aborted or preempted
     (`fail`): readers stop at once with the reason, so a consumer never takes blocks that
     vLLM may already reuse. Freed blocks are reported to vLLM only once no reader reads them
     (`drop_requests` keeps back request ids with readers).
Thread-safe: the engine thread advances and marks; KV server threads read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from kv_transfer.chunks import ChunkHeader
from kv_transfer.leases import ExpiredHandle, LeaseError, LeaseTable, UnknownHandle
from kv_transfer.paged_kv import PagedKVCache

StreamState = Literal["filling", "failed"]
POLL_S = 0.1  # readers re-check their caller's liveness this often while waiting
ReadyChunk = tuple[ChunkHeader, list[int]]  # a chunk and the producer block ids it carries


class StreamFailed(LeaseError):
    """The stream's request was aborted or preempted, or a reader waited too long."""


class PullSource(Protocol):
    """What one pull reads on the producer: a leased prompt or a stream. The caller owns one
    reader of it and must call `finish` exactly once."""

    waited_s: float  # time spent waiting for blocks to be computed (streams)

    def chunks(self, max_chunk_bytes: int,
               is_active: Callable[[], bool]) -> Iterator[ReadyChunk]: ...

    def finish(self) -> None: ...


class LeasePull:
    """A pull of leased (fully computed) blocks: chunks layer by layer."""

    def __init__(self, cache: PagedKVCache, leases: LeaseTable, handle: str,
                 block_ids: list[int]) -> None:
        self._cache, self._leases, self._handle = cache, leases, handle
        self._block_ids = block_ids
        self.waited_s = 0.0

    def chunks(self, max_chunk_bytes: int,
               is_active: Callable[[], bool]) -> Iterator[ReadyChunk]:
        for header in self._cache.plan_chunks(len(self._block_ids), max_chunk_bytes):
            first = header.first_block
            yield header, self._block_ids[first : first + header.num_blocks]

    def finish(self) -> None:
        self._leases.finish_pull(self._handle)


@dataclass
class _Stream:
    request_id: str
    num_prompt_tokens: int
    block_size: int
    block_ids: list[int]
    ready_tokens: list[int]  # per layer: prompt tokens whose KV is written
    target_tokens: int  # prompt tokens computed once the current step ends
    state: StreamState = "filling"
    reason: str = ""
    num_readers: int = 0

    @property
    def num_blocks(self) -> int:
        return -(-self.num_prompt_tokens // self.block_size)

    def num_ready_blocks(self, layer_index: int) -> int:
        tokens = self.ready_tokens[layer_index]
        if tokens >= self.num_prompt_tokens:
            return min(self.num_blocks, len(self.block_ids))
        return min(tokens // self.block_size, len(self.block_ids))


@dataclass
class StreamReader:
    """One pull of a contiguous run of a stream's blocks; the caller must call `finish`."""

    _table: StreamTable
    _handle: str
    _stream: _Stream
    first_index: int
    num_blocks: int
    timeout_s: float
    waited_s: float = field(default=0.0)

    def chunks(self, max_chunk_bytes: int, is_active: Callable[[], bool]) -> Iterator[ReadyChunk]:
        """Chunks in the order they are computed; `header.first_block` counts from first_index.

        Raises StreamFailed if the stream fails or nothing new is ready for timeout_s; ends
        early (without every block) once is_active() turns false.
        """
        table, stream, timeout_s = self._table, self._stream, self.timeout_s
        num_layers = len(stream.ready_tokens)
        sent = [0] * num_layers
        while True:
            with table.cond:
                deadline = time.monotonic() + timeout_s
                while True:
                    if stream.state == "failed":
                        raise StreamFailed(f"stream ended: {stream.reason}")
                    ready = [self._ready(layer) for layer in range(num_layers)]
                    if any(r > s for r, s in zip(ready, sent, strict=True)):
                        break
                    if all(s == self.num_blocks for s in sent):
                        return
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise StreamFailed(f"no block computed for {timeout_s:.1f} s")
                    started = time.perf_counter()
                    table.cond.wait(min(remaining, POLL_S))
                    self.waited_s += time.perf_counter() - started
                    if not is_active():
                        return
                lo = self.first_index
                block_ids = stream.block_ids[lo : lo + max(ready)]
            for layer in range(num_layers):
                yield from self._plan(layer, sent[layer], ready[layer], block_ids,
                                      max_chunk_bytes)
                sent[layer] = ready[layer]

    def finish(self) -> None:
        self._table.finish_reader(self._stream)

    def _ready(self, layer: int) -> int:
        ready = self._stream.num_ready_blocks(layer) - self.first_index
        return max(0, min(self.num_blocks, ready))

    def _plan(self, layer: int, start: int, stop: int, block_ids: list[int],
              max_chunk_bytes: int) -> Iterator[ReadyChunk]:
        block_bytes = self._table.block_bytes_per_layer[layer]
        per_chunk = max(1, max_chunk_bytes // block_bytes)
        for first in range(start, stop, per_chunk):
            count = min(per_chunk, stop - first)
            header = ChunkHeader(layer, first, count, count * block_bytes)
            yield header, block_ids[first : first + count]


class StreamTable:
    """All streams of one producer worker, keyed by stream handle."""

    def __init__(self, block_bytes_per_layer: list[int], block_size: int,
                 num_tombstones: int = 4096) -> None:
        self.block_bytes_per_layer = block_bytes_per_layer
        self._block_size = block_size
        self.cond = threading.Condition()
        self._streams: dict[str, _Stream] = {}
        self._by_request: dict[str, str] = {}
        self._tombstones: dict[str, str] = {}
        self._num_tombstones = num_tombstones

    def advance(self, handle: str, request_id: str, num_prompt_tokens: int,
                block_ids: tuple[int, ...], num_ready_tokens: int, num_target_tokens: int) -> None:
        """A step of the request is about to run (engine thread, before the forward pass)."""
        with self.cond:
            if handle in self._tombstones:
                return
            stream = self._streams.get(handle)
            if stream is None:
                num_layers = len(self.block_bytes_per_layer)
                stream = _Stream(request_id, num_prompt_tokens, self._block_size, [],
                                 [num_ready_tokens] * num_layers, num_ready_tokens)
                self._streams[handle] = stream
                self._by_request[request_id] = handle
            elif list(block_ids[: len(stream.block_ids)]) != stream.block_ids:
                self._fail_locked(handle, "the prefill was preempted")
                return
            stream.block_ids = list(block_ids)
            stream.target_tokens = min(num_target_tokens, num_prompt_tokens)
            self.cond.notify_all()

    def mark_layer(self, layer_index: int) -> None:
        """The current step wrote this layer of every scheduled stream (engine thread)."""
        with self.cond:
            changed = False
            for stream in self._streams.values():
                if stream.ready_tokens[layer_index] < stream.target_tokens:
                    stream.ready_tokens[layer_index] = stream.target_tokens
                    changed = True
            if changed:
                self.cond.notify_all()

    def mark_all(self) -> None:
        for layer_index in range(len(self.block_bytes_per_layer)):
            self.mark_layer(layer_index)

    def fail(self, handle: str, reason: str) -> None:
        """The request will not hand its blocks off (aborted, preempted, refused)."""
        with self.cond:
            self._fail_locked(handle, reason)

    def open_reader(self, handle: str, block_indices: list[int], wait_s: float,
                    read_timeout_s: float) -> StreamReader:
        """Start a read of these prompt block indices (contiguous, ascending); waits up to
        wait_s for a stream whose request the producer has not scheduled yet. The reader
        gives up when no new block is computed for read_timeout_s."""
        if not block_indices or block_indices != list(
            range(block_indices[0], block_indices[0] + len(block_indices))
        ):
            raise LeaseError("a stream pull needs a contiguous run of block indices")
        deadline = time.monotonic() + wait_s
        with self.cond:
            while handle not in self._streams:
                if handle in self._tombstones:
                    raise ExpiredHandle(f"stream {self._tombstones[handle]}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UnknownHandle("unknown stream handle")
                self.cond.wait(remaining)
            stream = self._streams[handle]
            if stream.state == "failed":
                raise ExpiredHandle(f"stream {stream.reason}")
            if block_indices[-1] >= stream.num_blocks:
                raise LeaseError(f"the prompt has {stream.num_blocks} blocks")
            stream.num_readers += 1
            return StreamReader(self, handle, stream, block_indices[0], len(block_indices),
                                read_timeout_s)

    def finish_reader(self, stream: _Stream) -> None:
        with self.cond:
            stream.num_readers -= 1
            assert stream.num_readers >= 0, "finish without open_reader"
            handle = self._by_request.get(stream.request_id)
            if stream.state == "failed" and stream.num_readers == 0 and handle is not None:
                self._remove_locked(handle, stream.reason)
            self.cond.notify_all()

    def drop_requests(self, request_ids: set[str]) -> set[str]:
        """Forget the streams of requests whose blocks are about to be freed; returns the ids
        whose streams still have readers (free those blocks later)."""
        busy = set()
        with self.cond:
            for request_id in request_ids:
                handle = self._by_request.get(request_id)
                if handle is None:
                    continue
                stream = self._streams[handle]
                if stream.num_readers:
                    self._fail_locked(handle, "lease ended")
                    busy.add(request_id)
                    continue
                self._remove_locked(handle, "lease ended")
        return busy

    @property
    def num_streams(self) -> int:
        with self.cond:
            return len(self._streams)

    def _fail_locked(self, handle: str, reason: str) -> None:
        stream = self._streams.get(handle)
        if stream is None:
            self._tombstone(handle, reason)
            return
        if stream.state != "failed":
            stream.state, stream.reason = "failed", reason
        if stream.num_readers == 0:
            self._remove_locked(handle, reason)
        self.cond.notify_all()

    def _remove_locked(self, handle: str, reason: str) -> None:
        stream = self._streams.pop(handle)
        self._by_request.pop(stream.request_id, None)
        self._tombstone(handle, reason)

    def _tombstone(self, handle: str, reason: str) -> None:
        self._tombstones[handle] = reason
        if len(self._tombstones) > self._num_tombstones:
            self._tombstones.pop(next(iter(self._tombstones)))
