"""The chunk header every data channel moves, its one check, and its wire forms.

A chunk is a run of blocks of one layer: `ChunkHeader(layer_index, first_block, num_blocks,
num_bytes)`, `first_block` counting within the pull's block list. The producer plans chunks
(`PagedKVCache.plan_chunks`, `StreamReader.chunks`), the consumer checks each header with
`check_chunk` before it reads or scatters the payload (sink.py). The medium decides the wire form
of the same header (protos/kv_transfer.proto documents all three):
  - gRPC stream: a `BlockChunk` protobuf message carrying the payload (`ChunkEncoder`,
    `decode_chunk`: hand-written so the payload is gathered in place and read without a copy);
  - bulk TCP: a fixed "<IIIQ" frame header before the raw payload (`pack_frame`, `unpack_frame`);
  - collective: a `CollectiveProgress` announcement, the payload on the pair group
    (`to_progress`, `from_progress`).
The producer's wait for blocks still being computed travels at the end of each stream, in
microseconds (`wait_us`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kv_transfer.transport import TransferError
from protos import kv_transfer_pb2 as pb

if TYPE_CHECKING:
    from kv_transfer.paged_kv import PagedKVCache

FRAME = struct.Struct("<IIIQ")  # bulk TCP: layer, first block, block count, payload bytes
_PAYLOAD_TAG = bytes([(4 << 3) | 2])  # BlockChunk.payload: field 4, length-delimited


@dataclass(frozen=True)
class ChunkHeader:
    """One chunk: `num_blocks` blocks of layer `layer_index`, starting at index `first_block`
    of the pull's blocks; `num_bytes` of payload."""

    layer_index: int
    first_block: int
    num_blocks: int
    num_bytes: int


def check_chunk(header: ChunkHeader, num_blocks: int, block_bytes_per_layer: Sequence[int],
                capacity: int | None = None, wire: str = "chunk") -> None:
    """Raise TransferError unless the header names blocks the consumer asked for (num_blocks
    of them), of a layer it has, with exactly their bytes in its layout, within the buffer
    (capacity) it will read them into. `wire` names the message in the error."""
    layer, first, count, size = (header.layer_index, header.first_block, header.num_blocks,
                                 header.num_bytes)
    if count == 0:
        reason = "no blocks"
    elif first + count > num_blocks:
        reason = f"only {num_blocks} blocks were asked for"
    elif layer >= len(block_bytes_per_layer):
        reason = f"the consumer has {len(block_bytes_per_layer)} layers"
    elif size != count * block_bytes_per_layer[layer]:
        reason = (f"expected {count * block_bytes_per_layer[layer]} bytes; producer and consumer "
                  "KV layouts differ (model, block size or dtype)")
    elif capacity is not None and size > capacity:
        reason = f"larger than the {capacity} byte chunk this consumer asked for"
    else:
        return
    raise TransferError(f"malformed {wire} (layer {layer}, blocks {first}+{count}, {size} "
                        f"bytes): {reason}")


def wait_us(waited_s: float) -> int:
    """The producer's wait as it travels at the end of a stream."""
    return int(waited_s * 1e6)


# gRPC stream: BlockChunk


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class ChunkEncoder:
    """Serializes BlockChunks of one stream: a hand-written protobuf header followed by the
    payload, which `bytes.join` copies from the paged cache's block views straight into the
    outgoing message (gRPC sends only bytes): one copy of every KV byte, as a gather makes."""

    def __init__(self, cache: PagedKVCache, block_ids: list[int] | None = None) -> None:
        self._cache = cache
        self._block_ids = block_ids or []

    def encode(self, header: ChunkHeader, blocks: list[int] | None = None) -> bytes:
        """The chunk of `header`; its payload is `blocks` of its layer (default: the header's
        share of the encoder's block_ids)."""
        if blocks is None:
            blocks = self._block_ids[header.first_block : header.first_block + header.num_blocks]
        fields = pb.BlockChunk(
            layer_index=header.layer_index, first_block=header.first_block,
            num_blocks=header.num_blocks,
        ).SerializeToString()
        prefix = fields + _PAYLOAD_TAG + _varint(header.num_bytes)
        message = b"".join((prefix, *self._cache.block_views(header.layer_index, blocks)))
        assert len(message) == len(prefix) + header.num_bytes, "chunk size differs from header"
        return message


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise TransferError("malformed chunk: truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def decode_chunk(message: bytes) -> tuple[ChunkHeader, memoryview]:
    """Parse a serialized BlockChunk without copying its payload (protobuf would copy it);
    the header's num_bytes is the payload's length."""
    data = memoryview(message)
    fields = {1: 0, 2: 0, 3: 0}
    payload = data[0:0]
    pos = 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
            fields[number] = value
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise TransferError("malformed chunk: truncated field")
            if number == 4:
                payload = data[pos : pos + length]
            pos += length
        else:
            raise TransferError(f"malformed chunk: unexpected wire type {wire_type}")
    return ChunkHeader(fields[1], fields[2], fields[3], len(payload)), payload


# Bulk TCP: "<IIIQ" frames; a frame of zero blocks ends the stream and carries the wait


def pack_frame(header: ChunkHeader) -> bytes:
    return FRAME.pack(header.layer_index, header.first_block, header.num_blocks,
                      header.num_bytes)


def pack_end_frame(waited_s: float) -> bytes:
    return FRAME.pack(0, 0, 0, wait_us(waited_s))


def unpack_frame(data: bytes | memoryview) -> ChunkHeader | float:
    """A chunk's header, or (the end frame) the producer's wait in seconds."""
    layer, first, count, size = FRAME.unpack(data)
    return ChunkHeader(layer, first, count, size) if count else size / 1e6


# Collective: CollectiveProgress announcements (stream pulls) and the closing message


def to_progress(header: ChunkHeader) -> pb.CollectiveProgress:
    return pb.CollectiveProgress(num_bytes=header.num_bytes, layer_index=header.layer_index,
                                 first_block=header.first_block, num_blocks=header.num_blocks)


def from_progress(message: pb.CollectiveProgress) -> ChunkHeader:
    return ChunkHeader(message.layer_index, message.first_block, message.num_blocks,
                       message.num_bytes)


def closing_progress(waited_s: float) -> pb.CollectiveProgress:
    return pb.CollectiveProgress(done=True, producer_wait_us=wait_us(waited_s))
