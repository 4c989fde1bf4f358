"""Paged KV block access and the BlockChunk wire codec."""

from __future__ import annotations

import pytest
import torch

from kv_transfer.chunks import (
    ChunkEncoder,
    ChunkHeader,
    check_chunk,
    decode_chunk,
    from_progress,
    pack_end_frame,
    pack_frame,
    to_progress,
    unpack_frame,
)
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.transport import TransferError
from protos import kv_transfer_pb2 as pb


def _cache(shape: tuple[int, ...], num_blocks: int, dtype=torch.float32, seed=0) -> PagedKVCache:
    gen = torch.Generator().manual_seed(seed)
    layers = {f"l{i}": torch.randn(shape, generator=gen).to(dtype) for i in range(2)}
    return PagedKVCache(layers, num_blocks)


def test_chunk_plan_covers_every_block_of_every_layer_once():
    cache = _cache((10, 2, 4, 8), 10)  # 256 B per block per layer
    plans = list(cache.plan_chunks(7, max_chunk_bytes=600))
    for layer in range(2):
        covered = [b for p in plans if p.layer_index == layer
                   for b in range(p.first_block, p.first_block + p.num_blocks)]
        assert covered == list(range(7))
    assert all(p.num_bytes <= 600 for p in plans)


def test_a_block_larger_than_the_chunk_still_moves():
    cache = _cache((4, 2, 4, 8), 4)
    plans = list(cache.plan_chunks(3, max_chunk_bytes=16))
    assert [p.num_blocks for p in plans] == [1] * 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(6, 2, 4, 6), (2, 6, 4, 3, 5)])
def test_gather_then_scatter_round_trips(shape, dtype):
    src, dst = _cache(shape, 6, dtype, seed=1), _cache(shape, 6, dtype, seed=2)
    ids_src, ids_dst = [4, 1], [0, 5]
    for layer in range(src.num_layers):
        size = 2 * src.block_bytes_per_layer[layer]
        buf = bytearray(size)
        src.gather_into(layer, ids_src, buf, 0)
        dst.scatter_from(layer, ids_dst, bytes(buf))
    assert src.layout_signature == dst.layout_signature
    for name in src.layer_names:
        a, b = src_tensor(src, name), src_tensor(dst, name)
        block_dim = 0 if a.shape[0] == 6 else 1
        for s, d in zip(ids_src, ids_dst, strict=True):
            assert torch.equal(a.select(block_dim, s), b.select(block_dim, d))


def src_tensor(cache: PagedKVCache, name: str) -> torch.Tensor:
    return cache._layers[cache.layer_names.index(name)]


def test_unknown_layouts_and_bad_block_ids_are_refused():
    with pytest.raises(ValueError, match="block dimension"):
        PagedKVCache({"l": torch.zeros(3, 7, 2)}, num_blocks=5)
    cache = _cache((4, 2, 4, 8), 4)
    with pytest.raises(ValueError, match="out of range"):
        cache.check_block_ids([0, 4])


def test_encoded_chunks_are_valid_protobuf_and_decode_without_copy():
    cache = _cache((5, 2, 4, 8), 5)
    encoder = ChunkEncoder(cache, [3, 1, 4])
    for plan in cache.plan_chunks(3, max_chunk_bytes=512):
        message = encoder.encode(plan)
        parsed = pb.BlockChunk.FromString(message)
        assert (parsed.layer_index, parsed.first_block, parsed.num_blocks) == (
            plan.layer_index, plan.first_block, plan.num_blocks)
        header, payload = decode_chunk(message)
        assert header == plan
        assert bytes(payload) == parsed.payload
        assert payload.obj is message  # a view, not a copy


def test_decoder_reads_protobuf_written_by_protobuf():
    message = pb.BlockChunk(layer_index=3, first_block=0, num_blocks=2,
                            payload=b"x" * 300).SerializeToString()
    header, payload = decode_chunk(message)
    assert header == ChunkHeader(layer_index=3, first_block=0, num_blocks=2, num_bytes=300)
    assert bytes(payload) == b"x" * 300


@pytest.mark.parametrize("message", [b"\x08", b"\x22\x05ab", b"\x0b\x00"])
def test_malformed_chunks_raise_transfer_errors(message):
    with pytest.raises(TransferError, match="malformed"):
        decode_chunk(message)


@pytest.mark.parametrize("shape", [(7, 2, 4, 6), (2, 7, 4, 3, 5)])
def test_block_views_hold_the_bytes_gather_writes(shape):
    cache = _cache(shape, 7, torch.bfloat16, seed=3)
    for ids in ([4, 1], [2, 3, 4, 0], [6], [1, 2, 3, 5, 6]):
        for layer in range(cache.num_layers):
            gathered = bytearray(len(ids) * cache.block_bytes_per_layer[layer])
            cache.gather_into(layer, ids, gathered, 0)
            assert b"".join(cache.block_views(layer, ids)) == gathered


def test_every_wire_form_carries_the_same_header():
    header = ChunkHeader(layer_index=2, first_block=5, num_blocks=3, num_bytes=768)
    assert unpack_frame(pack_frame(header)) == header
    assert unpack_frame(pack_end_frame(0.25)) == 0.25  # the end frame: the producer's wait
    assert from_progress(to_progress(header)) == header


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (ChunkHeader(0, 0, 0, 0), "no blocks"),
        (ChunkHeader(0, 3, 2, 512), "only 4 blocks were asked for"),
        (ChunkHeader(2, 0, 1, 256), "the consumer has 2 layers"),
        (ChunkHeader(1, 0, 2, 500), "expected 512 bytes; producer and consumer KV layouts"),
        (ChunkHeader(1, 0, 4, 1024), "larger than the 600 byte chunk"),
    ],
)
def test_one_check_refuses_every_chunk_the_consumer_did_not_ask_for(header, reason):
    check_chunk(ChunkHeader(1, 2, 2, 512), 4, [256, 256], capacity=600)  # a good one passes
    with pytest.raises(TransferError, match=f"malformed frame .*: {reason}"):
        check_chunk(header, 4, [256, 256], capacity=600, wire="frame")
