"""The transport interface: how KV blocks move from a producer worker to a consumer worker.

Producer side: a `KVBlockServer` runs inside the producer's worker process, next to its paged KV
tensors, and serves the blocks of granted leases (see leases.py). Consumer side: a
`KVBlockClient` runs inside the consumer's worker process and pulls blocks straight into its own
paged KV tensors. Control (which blocks, which handle, release) and payload may take different
channels; the gRPC transport carries both, an NCCL transport would carry only the payload.
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


class KVBlockServer(ABC):
    """Serves leased blocks of one producer worker."""

    @abstractmethod
    def start(self) -> str:
        """Begin serving; returns the endpoint consumers dial. Called exactly once."""

    @abstractmethod
    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving; in-flight pulls are cut after grace_s. Idempotent."""


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
