"""Replica reports that are all late at once (the ingress stalled) do not make the scheduler
refuse requests; reports too old, or a replica whose call failed, still do."""

from __future__ import annotations

import time

from runtime.scheduler.live import LATE_READS_GRACE_S, LiveConfig, LiveScheduler
from runtime.scheduler.policy import PolicyConfig
from runtime.scheduler.types import Decision, Rejection, ReplicaReport


def _live(age_s: float) -> LiveScheduler:
    """One replica per pool, both last reporting age_s ago."""
    live = LiveScheduler(LiveConfig(PolicyConfig(long_prompt_tokens=1000), 0, 16, 8))
    at = time.time() - age_s
    live.report(ReplicaReport("prefill", "p0", 0, 1000, 1000, 16, 0, 8, at))
    live.report(ReplicaReport("decode", "d0", 0, 1000, 1000, 16, 0, 8, at))
    return live


def test_reports_all_late_at_once_still_count() -> None:
    live = _live(age_s=2.0)  # past stale_after_s (1 s): each replica alone would be out
    assert not live.prefill.live(time.monotonic(), 1.0).any()
    decision = live.decide("r", 100, 16)
    assert isinstance(decision, Decision), decision
    assert live.policy.config.stale_after_s == 1.0  # the grace applied to that decision only


def test_reports_older_than_the_grace_are_refused() -> None:
    decision = _live(age_s=LATE_READS_GRACE_S + 1.0).decide("r", 100, 16)
    assert isinstance(decision, Rejection) and decision.unavailable


def test_a_replica_whose_call_failed_gets_no_grace() -> None:
    live = _live(age_s=2.0)
    now = time.monotonic()
    live.policy.replica_failed("prefill", "p0", now)
    live.policy.replica_failed("decode", "d0", now)
    decision = live.decide("r", 100, 16)
    assert isinstance(decision, Rejection) and decision.unavailable
