"""The Serve request router that pins a call to the replica the scheduler chose."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from runtime.routing import PinnedReplicaRouter


def _replica(unique_id: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id))


def _pending(**kwargs: object) -> SimpleNamespace:
    return SimpleNamespace(kwargs=kwargs, routing_context=SimpleNamespace(should_backoff=False))


def _choose(candidates: list[SimpleNamespace], pending: SimpleNamespace | None) -> list:
    # choose_replicas reads only its arguments: no Serve router state is needed
    return asyncio.run(PinnedReplicaRouter.choose_replicas(None, candidates, pending))  # type: ignore[arg-type]


def test_the_target_replica_is_chosen_when_serve_has_it_else_any() -> None:
    a, b = _replica("a"), _replica("b")
    assert _choose([a, b], _pending(target_replica="b")) == [[b]]
    assert _choose([a, b], _pending(target_replica="gone")) == [[a, b]]
    assert _choose([a, b], _pending()) == [[a, b]]
    assert _choose([a, b], None) == [[a, b]]


def test_serve_is_told_to_back_off_between_tries() -> None:
    # Without it Serve retries a full (or slow to answer) replica at once, in a loop that
    # starved the ingress's event loop.
    pending = _pending(target_replica="a")
    _choose([_replica("a")], pending)
    assert pending.routing_context.should_backoff is True
