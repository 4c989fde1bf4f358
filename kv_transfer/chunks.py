"""BlockChunk wire codec: encode with the payload gathered in place, decode without a copy.

The encoding is exactly protobuf's for `disagg.kv.BlockChunk` (protos/kv_transfer.proto), so any
protobuf library can read it; only the payload handling is hand-written, to skip two copies of
every KV byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from kv_transfer.paged_kv import ChunkPlan, PagedKVCache
from kv_transfer.transport import TransferError
from protos import kv_transfer_pb2 as pb

_PAYLOAD_TAG = bytes([(4 << 3) | 2])  # BlockChunk.payload: field 4, length-delimited


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

    def encode(self, plan: ChunkPlan, blocks: list[int] | None = None) -> bytes:
        """The chunk of `plan`; its payload is `blocks` of its layer (default: the plan's
        share of the encoder's block_ids)."""
        if blocks is None:
            blocks = self._block_ids[plan.first_block : plan.first_block + plan.num_blocks]
        header = pb.BlockChunk(
            layer_index=plan.layer_index, first_block=plan.first_block,
            num_blocks=plan.num_blocks,
        ).SerializeToString()
        prefix = header + _PAYLOAD_TAG + _varint(plan.num_bytes)
        message = b"".join((prefix, *self._cache.block_views(plan.layer_index, blocks)))
        assert len(message) == len(prefix) + plan.num_bytes, "chunk size differs from its plan"
        return message


@dataclass(frozen=True)
class DecodedChunk:
    layer_index: int
    first_block: int
    num_blocks: int
    payload: memoryview


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


def decode_chunk(message: bytes) -> DecodedChunk:
    """Parse a serialized BlockChunk without copying its payload (protobuf would copy it)."""
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
    return DecodedChunk(fields[1], fields[2], fields[3], payload)
