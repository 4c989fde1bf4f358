"""A Ray Serve request router that sends a request to the replica the global scheduler chose.

The caller names the replica in the `target_replica` keyword argument of the handle call; with
no target (or a replica that is gone), Serve's candidates are all acceptable.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

TARGET_KWARG = "target_replica"


class PinnedReplicaRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get(TARGET_KWARG) if pending_request else None
        if pending_request is not None:
            # Serve retries a request whose candidates are all full (or do not answer its
            # queue-length probe in time) at once, without backing off, unless the router
            # says it has tried everything (its own routers do, via locality routing). These
            # candidates are everything: without this the ingress's event loop spun on
            # probes and stopped serving (load reports timed out, every replica looked dead).
            pending_request.routing_context.should_backoff = True
        if target:
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if pinned:
                return [pinned]
        return [candidate_replicas]
