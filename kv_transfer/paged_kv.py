"""Whole-block access to an engine's paged KV cache: gather blocks out, scatter blocks in.

The engine owns one tensor per attention layer. Layouts differ by backend (the CPU backend keeps
blocks on dim 0: [num_blocks, kv_heads, block_size, 2 * head_size]; flash-attention keeps K and V
on dim 0 and blocks on dim 1: [2, num_blocks, block_size, kv_heads, head_size]); both are handled
by indexing along the block dimension of an integer view of the bytes (the widest integer
that divides a row: int64 copies run several times faster than byte-wise copies), so the KV
dtype never matters.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping

import torch

from kv_transfer.chunks import ChunkHeader


class PagedKVCache:
    """Block-granular view over the per-layer KV tensors of one worker.

    Layers are ordered by name so producer and consumer agree on layer indices. Both sides must
    run the same model with the same block size and dtype (checked by `check_compatible`).
    """

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int,
                 block_dims: list[int] | None = None) -> None:
        assert kv_caches, "no KV cache tensors registered"
        self.layer_names = sorted(kv_caches)
        self.num_blocks = num_blocks
        self.dtype = str(kv_caches[self.layer_names[0]].dtype).removeprefix("torch.")
        self._layers = [self._word_view(kv_caches[name]) for name in self.layer_names]
        self._block_dims = block_dims or [
            self._find_block_dim(kv_caches[name]) for name in self.layer_names
        ]
        self.block_bytes_per_layer = [
            layer.numel() * layer.element_size() // num_blocks for layer in self._layers
        ]

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block summed over all layers."""
        return sum(self.block_bytes_per_layer)

    @property
    def layout_signature(self) -> tuple[tuple[int, ...], ...]:
        """Per-layer shape of one block in bytes; equal signatures can exchange blocks."""
        return tuple(
            tuple(s for d, s in enumerate(layer.shape) if d != dim)
            for layer, dim in zip(self._layers, self._block_dims, strict=True)
        )

    def plan_chunks(self, num_blocks: int, max_chunk_bytes: int) -> Iterator[ChunkHeader]:
        """Split a transfer of num_blocks blocks into chunks, layer by layer.

        A chunk holds at least one block even when one block exceeds max_chunk_bytes.
        """
        for layer_index, block_bytes in enumerate(self.block_bytes_per_layer):
            per_chunk = max(1, max_chunk_bytes // block_bytes)
            for first in range(0, num_blocks, per_chunk):
                count = min(per_chunk, num_blocks - first)
                yield ChunkHeader(layer_index, first, count, count * block_bytes)

    def gather_into(
        self, layer_index: int, block_ids: list[int], buffer: bytearray | memoryview, offset: int
    ) -> None:
        """Copy the given blocks of one layer into a writable buffer, from byte offset on."""
        layer, dim = self._layers[layer_index], self._block_dims[layer_index]
        shape = list(layer.shape)
        shape[dim] = len(block_ids)
        count = len(block_ids) * self.block_bytes_per_layer[layer_index] // layer.element_size()
        target = torch.frombuffer(buffer, dtype=layer.dtype, offset=offset, count=count)
        index = torch.tensor(block_ids, dtype=torch.long, device=layer.device)
        torch.index_select(layer, dim, index, out=target.view(shape))

    def block_views(self, layer_index: int, block_ids: list[int]) -> list[memoryview]:
        """The given blocks of one layer as read-only views of the paged tensor, in the byte
        order gather_into writes (for each index of the dims before the block dim, the blocks
        in order); a run of consecutive block ids is one view. `b"".join(views)` then gathers
        them with one copy. A tensor off the CPU is gathered to host memory first."""
        layer, dim = self._layers[layer_index], self._block_dims[layer_index]
        if layer.device.type != "cpu":
            index = torch.tensor(block_ids, dtype=torch.long, device=layer.device)
            return [torch.index_select(layer, dim, index).cpu().numpy().data.toreadonly()]
        # Dims before the block dim folded into one: (outer, num_blocks, *block shape).
        array = layer.numpy().reshape((-1, *layer.shape[dim:]))
        runs = _runs(block_ids)
        return [outer[first : first + count].data.toreadonly()
                for outer in array for first, count in runs]

    def scatter_from(
        self, layer_index: int, block_ids: list[int], data: bytes | memoryview
    ) -> None:
        """Write the given blocks of one layer from data produced by gather_into."""
        layer, dim = self._layers[layer_index], self._block_dims[layer_index]
        shape = list(layer.shape)
        shape[dim] = len(block_ids)
        with warnings.catch_warnings():
            # the payload is read-only bytes; it is only read from, never written
            warnings.simplefilter("ignore", UserWarning)
            source = torch.frombuffer(data, dtype=layer.dtype).view(shape)
        index = torch.tensor(block_ids, dtype=torch.long, device=layer.device)
        layer.index_copy_(dim, index, source.to(layer.device))

    def gather_tensor(self, layer_index: int, block_ids: list[int], out: torch.Tensor) -> int:
        """Copy the given blocks of one layer into the front of out (a flat uint8 tensor on any
        device, at least as large); returns the bytes written. Same byte layout as gather_into.
        """
        layer, dim = self._layers[layer_index], self._block_dims[layer_index]
        num_bytes = len(block_ids) * self.block_bytes_per_layer[layer_index]
        shape = list(layer.shape)
        shape[dim] = len(block_ids)
        index = torch.tensor(block_ids, dtype=torch.long, device=layer.device)
        if out.device == layer.device:
            torch.index_select(layer, dim, index, out=out[:num_bytes].view(layer.dtype).view(shape))
        else:
            out[:num_bytes].copy_(torch.index_select(layer, dim, index).view(-1).view(torch.uint8))
        return num_bytes

    def scatter_tensor(self, layer_index: int, block_ids: list[int], data: torch.Tensor) -> None:
        """Write the given blocks of one layer from the front of data (flat uint8, any device),
        laid out as gather_tensor wrote them."""
        layer, dim = self._layers[layer_index], self._block_dims[layer_index]
        num_bytes = len(block_ids) * self.block_bytes_per_layer[layer_index]
        shape = list(layer.shape)
        shape[dim] = len(block_ids)
        source = data[:num_bytes].to(layer.device).view(layer.dtype).view(shape)
        index = torch.tensor(block_ids, dtype=torch.long, device=layer.device)
        layer.index_copy_(dim, index, source)

    def staging(self, num_blocks: int) -> PagedKVCache:
        """A new cache of num_blocks blocks with this one's layers, layout and device (a
        consumer's prefetch buffer: filled like a paged cache, copied in by copy_blocks_from)."""
        tensors = {}
        for name, layer, dim in zip(self.layer_names, self._layers, self._block_dims,
                                    strict=True):
            shape = list(layer.shape)
            shape[dim] = num_blocks
            tensors[name] = torch.empty(shape, dtype=layer.dtype, device=layer.device)
        return PagedKVCache(tensors, num_blocks, list(self._block_dims))

    def copy_blocks_from(self, source: PagedKVCache, source_ids: list[int],
                         block_ids: list[int]) -> int:
        """Copy source's blocks (every layer) into these blocks; returns the bytes copied."""
        assert source.layout_signature == self.layout_signature, "KV layouts differ"
        for layer, src, dim in zip(self._layers, source._layers, self._block_dims, strict=True):
            src_index = torch.tensor(source_ids, dtype=torch.long, device=src.device)
            index = torch.tensor(block_ids, dtype=torch.long, device=layer.device)
            layer.index_copy_(dim, index, src.index_select(dim, src_index).to(layer.device))
        return len(block_ids) * self.block_bytes

    @property
    def device(self) -> torch.device:
        return self._layers[0].device

    def check_block_ids(self, block_ids: list[int]) -> None:
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"block ids out of range [0, {self.num_blocks}): {bad[:8]}")

    def _find_block_dim(self, tensor: torch.Tensor) -> int:
        if tensor.shape[0] == self.num_blocks:
            return 0
        if tensor.dim() > 1 and tensor.shape[0] == 2 and tensor.shape[1] == self.num_blocks:
            return 1
        raise ValueError(
            f"cannot find the block dimension of a KV tensor of shape {tuple(tensor.shape)} "
            f"with {self.num_blocks} blocks"
        )

    @staticmethod
    def _word_view(tensor: torch.Tensor) -> torch.Tensor:
        assert tensor.is_contiguous(), "paged KV tensors must be contiguous"
        row_bytes = tensor.shape[-1] * tensor.element_size()
        as_bytes = tensor.view(torch.uint8) if tensor.dtype != torch.uint8 else tensor
        for word in (torch.int64, torch.int32, torch.int16):
            if row_bytes % word.itemsize == 0:
                return as_bytes.view(word)
        return as_bytes


def _runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """(first id, count) of each run of consecutive ids, in order."""
    runs: list[tuple[int, int]] = []
    for block_id in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == block_id:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block_id, 1))
    return runs
