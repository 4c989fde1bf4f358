"""The consumer side's one sink: every data channel hands its chunks here.

Lifecycle of one part of a pull (the puller makes one sink per part, a channel fills it):
  1. `check` each chunk header as soon as it is read, before its payload is read or a buffer is
     sized from it (the one check, chunks.check_chunk);
  2. `write` the payload: scattered into the paged cache (or a prefetch's staging) at the local
     blocks the header names, and accounted (bytes, which layer-blocks arrived);
  3. `finish` at the producer's end of stream, with the producer's wait for blocks still being
     computed (every channel reports it here, however its wire carries it);
  4. `check_complete`: the part is done only if the stream ended and every layer of every block
     arrived.
Not thread-safe: one sink belongs to one part, filled by one thread.
"""

from __future__ import annotations

import torch

from kv_transfer.chunks import ChunkHeader, check_chunk
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.transport import TransferError


class ChunkSink:
    """Receives one part of a pull into `cache` at `block_ids` (chunk block i -> block_ids[i])."""

    def __init__(self, cache: PagedKVCache, block_ids: list[int]) -> None:
        self.cache = cache
        self.block_ids = block_ids
        self.num_bytes = 0
        self.producer_wait_s = 0.0
        self.is_finished = False
        self._received = [bytearray(len(block_ids)) for _ in range(cache.num_layers)]

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def block_bytes_per_layer(self) -> list[int]:
        return self.cache.block_bytes_per_layer

    def check(self, header: ChunkHeader, capacity: int | None = None,
              wire: str = "chunk") -> None:
        """Raise TransferError unless this part asked for the header's blocks, in this layout,
        within capacity bytes (the buffer the payload will be read into)."""
        check_chunk(header, self.num_blocks, self.cache.block_bytes_per_layer, capacity, wire)

    def write(self, header: ChunkHeader, payload: bytes | memoryview | torch.Tensor) -> None:
        """Scatter a checked chunk's payload (host bytes, or a flat uint8 tensor on any device)
        into its local blocks."""
        first, count = header.first_block, header.num_blocks
        blocks = self.block_ids[first : first + count]
        if isinstance(payload, torch.Tensor):
            self.cache.scatter_tensor(header.layer_index, blocks, payload)
        else:
            self.cache.scatter_from(header.layer_index, blocks, payload)
        self._received[header.layer_index][first : first + count] = b"\x01" * count
        self.num_bytes += header.num_bytes

    def put(self, header: ChunkHeader, payload: bytes | memoryview, wire: str = "chunk") -> None:
        """`check`, then `write`: for a chunk whose header and payload arrive together."""
        self.check(header, wire=wire)
        self.write(header, payload)

    def finish(self, producer_wait_s: float) -> None:
        """The producer ended the stream; it waited this long for blocks being computed."""
        self.producer_wait_s = producer_wait_s
        self.is_finished = True

    def check_complete(self, endpoint: str) -> None:
        """Raise TransferError unless the stream ended and every layer-block arrived."""
        missing = sum(row.count(0) for row in self._received)
        if missing or not self.is_finished:
            total = self.num_blocks * self.cache.num_layers
            raise TransferError(f"transfer from {endpoint} ended early: {total - missing} of "
                                f"{total} layer-blocks arrived")
