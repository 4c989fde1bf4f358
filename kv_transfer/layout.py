"""The wire protocol's version and the KV layout both sides must share, checked at first contact.

KV blocks move as raw bytes in the producer's paged layout, so a consumer may only pull from a
producer with the same layout: layer count, KV heads, head size, dtype, block size, and the bytes
of one block of each layer (which also differ between attention backends' arrangements). Before
its first pull from a producer, the consumer calls Handshake with its protocol version and layout
(control_client.py); the producer refuses a mismatch (control_server.py) with a message naming both
sides' values, so a mismatch fails there and never halfway through a transfer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kv_transfer.paged_kv import PagedKVCache
from protos import kv_transfer_pb2 as pb

# Bump on any change of the KVTransfer service's messages or their meaning.
PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class KVLayout:
    """What must be equal on both sides for KV blocks to move as bytes. 0 (or "") in a model
    field means unknown (a cache built outside vLLM); the bytes per block still count."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    block_bytes_per_layer: tuple[int, ...]

    @classmethod
    def of_cache(cls, cache: PagedKVCache, *, num_kv_heads: int = 0, head_dim: int = 0,
                 block_size: int = 0) -> KVLayout:
        return cls(cache.num_layers, num_kv_heads, head_dim, cache.dtype, block_size,
                   tuple(cache.block_bytes_per_layer))

    @property
    def compat_hash(self) -> str:
        """A digest of the protocol version and every field: equal hashes, compatible sides."""
        text = repr((PROTOCOL_VERSION, self.num_layers, self.num_kv_heads, self.head_dim,
                     self.dtype, self.block_size, self.block_bytes_per_layer))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        sizes = sorted(set(self.block_bytes_per_layer))
        return (f"{self.num_layers} layers x {self.num_kv_heads or '?'} kv heads x head_dim "
                f"{self.head_dim or '?'}, {self.dtype or '?'}, block {self.block_size or '?'} "
                f"tokens, {'/'.join(map(str, sizes))} B per block per layer")

    def to_wire(self) -> pb.KVLayout:
        return pb.KVLayout(
            num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            dtype=self.dtype, block_size=self.block_size,
            block_bytes_per_layer=self.block_bytes_per_layer,
        )

    @classmethod
    def from_wire(cls, message: pb.KVLayout) -> KVLayout:
        return cls(message.num_layers, message.num_kv_heads, message.head_dim, message.dtype,
                   message.block_size, tuple(message.block_bytes_per_layer))


@dataclass(frozen=True)
class Hello:
    """One side's first-contact statement: its protocol version, its KV layout and the layout's
    compatibility hash (computed by the sender; the sides compare hashes)."""

    protocol_version: int
    layout: KVLayout
    layout_hash: str

    @classmethod
    def mine(cls, layout: KVLayout) -> Hello:
        return cls(PROTOCOL_VERSION, layout, layout.compat_hash)

    def describe(self) -> str:
        return (f"protocol {self.protocol_version}, {self.layout.describe()}, layout hash "
                f"{self.layout_hash or '(none)'}")

    def to_wire(self) -> pb.Hello:
        return pb.Hello(protocol_version=self.protocol_version, layout_hash=self.layout_hash,
                        layout=self.layout.to_wire())

    @classmethod
    def from_wire(cls, message: pb.Hello) -> Hello:
        return cls(message.protocol_version, KVLayout.from_wire(message.layout),
                   message.layout_hash)


def mismatch(producer: Hello, consumer: Hello) -> str:
    """Why the two sides cannot exchange blocks, naming both sides' values; "" if they can."""
    if producer.protocol_version != consumer.protocol_version:
        what = "KV transfer protocol versions differ"
    elif producer.layout_hash != consumer.layout_hash:
        what = "KV layouts differ (model, dtype, block size or attention backend)"
    else:
        return ""
    return f"{what}: producer has {producer.describe()}; consumer has {consumer.describe()}"
