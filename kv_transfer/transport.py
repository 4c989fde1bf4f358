"""The consumer's transfer API: pull KV blocks from a producer worker into paged KV tensors.

`KVBlockClient` is what the connector's consumer side and its prefetcher call; the one
implementation is `puller.KVPuller` (control plane + one data channel, chosen by config). The
producer side is `control_server.ControlServer` with its data channels (channels/).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kv_transfer.paged_kv import PagedKVCache


class TransferError(Exception):
    """A pull failed; the message says why in words an operator can act on."""


@dataclass(frozen=True)
class PullResult:
    num_blocks: int
    transfer_bytes: int
    transfer_ms: float  # the pull's wall time
    producer_wait_ms: float = 0.0  # stream pulls: part of transfer_ms spent waiting for compute


class KVBlockClient(ABC):
    """Pulls blocks for one consumer worker. Thread-safe: many pulls may run at once."""

    @abstractmethod
    def pull(
        self,
        endpoint: str,
        handle: str,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        timeout_s: float,
        cancelled: threading.Event | None = None,
        *,
        sink: PagedKVCache | None = None,
        stream_handle: str = "",
    ) -> PullResult:
        """Copy remote blocks into local blocks (same order, same count) for every layer.

        Blocks until all blocks have arrived, raises TransferError on any failure (the local
        blocks then hold partial data) or after timeout_s. Stops early once `cancelled` is set.
        `sink` replaces the client's paged cache as the destination (a prefetch's staging).
        With `stream_handle` (and no handle) the remote ids are indices of the prompt's blocks
        on a producer still prefilling it; chunks arrive as they are computed.
        """

    @abstractmethod
    def release(self, endpoint: str, handle: str, timeout_s: float) -> None:
        """Tell the producer it may free the handle's blocks. Best effort, never raises."""

    @abstractmethod
    def close(self) -> None:
        """Drop connections. Idempotent."""
