"""NCCL transport (gloo on CPU): control over gRPC, block payload over a pair group.

Lifecycle of one pull (see protos/kv_transfer.proto for the wire):
  1. The consumer looks up its group for the producer's endpoint; if it has none (first pull,
     or the last one failed), it calls JoinGroup: the producer checks backend, tensor-parallel
     size and rank, and per-layer block bytes, refusing any mismatch with a message that says
     which; then both sides build a fresh two-rank group (collective.py) under a new name.
  2. The consumer calls PullCollective (handle, block ids, group name) and holds the group's
     lock until the pull ends: one transfer at a time per pair, so send order pairs with recv
     order without tags.
  3. The producer checks the lease, answers the bytes to come and its chunk size, then sends
     the chunks of `PagedKVCache.plan_chunks` in order; the consumer receives each chunk into
     a staging tensor and scatters it into its paged cache; the producer answers done.
  4. Any failure mid-transfer (peer died, timeout, cancel) closes the group on the side that
     saw it; the other side's next send/recv on it fails within the group timeout, and the
     producer refuses the stale name, so a group is never reused: the next pull rejoins.
  5. Release goes over gRPC, as for the other transports.
Tensor parallelism: both sides must run the same tensor-parallel size (worker i pulls from
worker i); unequal sizes are refused at JoinGroup. The connector itself accepts tp=1 only.

The producer side is `collective_sender.CollectiveSender` (with its gRPC handlers), the consumer
side `collective_client.CollectiveKVClient`; this module holds what both share.
"""

from __future__ import annotations

from dataclasses import dataclass

from kv_transfer.kinds import CollectiveBackend

STALE_GROUP = "stale transfer group"


class JoinRefused(Exception):
    """The producer will not pair with this consumer; the message says why."""


@dataclass(frozen=True)
class WorkerIdentity:
    """What a worker tells its peer at JoinGroup."""

    backend: CollectiveBackend
    tp_size: int
    tp_rank: int
