"""The "nccl" data channel (gloo on CPU): control over gRPC, block payload over a pair group.

Lifecycle of one pull (see protos/kv_transfer.proto for the wire):
  1. The consumer looks up its group for the producer's endpoint; if it has none (first pull,
     or the last one failed), it calls JoinGroup: the producer checks backend, tensor-parallel
     size and rank, and per-layer block bytes, refusing any mismatch with a message that says
     which; then both sides build a fresh two-rank group (pair_group.py) under a new name.
  2. The consumer calls PullCollective (handle, block ids, group name) and holds the group's
     lock until the pull ends: one transfer at a time per pair, so send order pairs with recv
     order without tags.
  3. The control plane checks the lease; the producer answers the bytes to come and its chunk
     size, then sends the chunks of `PagedKVCache.plan_chunks` in order (a stream pull
     announces each chunk's header first); the consumer receives each chunk into a staging
     tensor and hands it to its sink; the producer answers done, with its wait.
  4. Any failure mid-transfer (peer died, timeout, cancel) closes the group on the side that
     saw it; the other side's next send/recv on it fails within the group timeout, and the
     producer refuses the stale name, so a group is never reused: the next pull rejoins.
  5. Release goes over the control plane, as for the other channels.
Tensor parallelism: both sides must run the same tensor-parallel size (worker i pulls from
worker i); unequal sizes are refused at JoinGroup. The connector itself accepts tp=1 only.

The producer side is `collective_producer.CollectiveProducer`, the consumer side
`collective_consumer.CollectiveConsumer`; this module holds what both share.
"""

from __future__ import annotations

from kv_transfer.control import method_path

STALE_GROUP = "stale transfer group"
JOIN_METHOD = method_path("JoinGroup")
PULL_COLLECTIVE_METHOD = method_path("PullCollective")
