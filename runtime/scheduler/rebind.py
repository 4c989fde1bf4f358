"""Late binding of long prompts: whether a long prompt waiting for its turn should move.

A long prompt is booked on an engine when it arrives and waits at the ingress until the long
prompts booked there before it have their first token (work.py: one long prefill per engine
at a time). While it waits, the engines change: the long prefill ahead of it may run far past
its prediction (an engine slowed by its decodes, a stall), or another engine may finish its
own long prefill early and sit without one. Then the prompt moves: its bookings are released
and the policy decides again, not on the engine it leaves.

It moves when an engine with no long prompt outstanding is predicted to give its first token
clearly earlier (`CLEAR_WIN`, `MIN_GAIN_MS`) than its own engine, where the wait is the work
booked ahead of it; or when the long prefill ahead of it is late by `OVERDUE_MS` and by its
own predicted time, so that engine's predictions are not to be trusted, and another engine
with no long prompt can take it: another prefill replica, or a decode replica that may
prefill it itself (room, TPOT budget), charged what its long prefill then costs the short
prompts there less what it would have cost them where it waits (isolation.py, as the choice
on arrival counts it); under colocated serving, any other engine.
"""

from __future__ import annotations

import numpy as np

from runtime.scheduler.isolation import short_cost_ms
from runtime.scheduler.loads import other_than
from runtime.scheduler.policy import GlobalScheduler
from runtime.scheduler.types import Decision, Lane, RequestInfo

CHECK_EVERY_S = 0.25  # a waiting long prompt looks again this often (and when a long ends)
CLEAR_WIN = 0.8  # another engine's first token in at most this x the one here ...
MIN_GAIN_MS = 100.0  # ... and at least this much earlier
OVERDUE_MS = 1000.0


def move_reason(policy: GlobalScheduler, decision: Decision, request: RequestInfo,
                now_s: float) -> str | None:
    """Why the waiting long prompt should move off its engine now; None if it should stay."""
    return look(policy, decision, request, now_s)[0]


def look(policy: GlobalScheduler, decision: Decision, request: RequestInfo,
         now_s: float) -> tuple[str | None, str]:
    """(why the waiting long prompt should move now, None if it should stay; its engine
    against the others as seen now, for its decision_reason once it has waited long)."""
    table = policy.table_of(decision)
    work = table.work
    i = work.replica_of(request.request_id)
    if i is None or work.has_turn(request.request_id):
        return None, ""
    free_ms = _free_engine_ms(policy, decision, request, now_s)
    own_ms = work.booked_ms(request.request_id)
    here_ms = work.ahead_ms(request.request_id, now_s) + own_ms
    best = f"{free_ms:.0f} ms on the best engine with no long prompt" if free_ms is not None \
        else "no other engine without a long prompt"
    seen = f"{here_ms:.0f} ms predicted here, {best}"
    if free_ms is None:
        return None, seen
    overdue_ms = work.head_overdue_ms(i, now_s)
    if overdue_ms >= max(OVERDUE_MS, own_ms):
        return (f"the long prefill ahead on {table.ids[i]} is {overdue_ms:.0f} ms late; an "
                f"engine with no long prompt predicts {free_ms:.0f} ms"), seen
    if free_ms <= CLEAR_WIN * here_ms and here_ms - free_ms >= MIN_GAIN_MS:
        return (f"{here_ms:.0f} ms predicted on {table.ids[i]}, {free_ms:.0f} ms on an engine "
                "with no long prompt"), seen
    return None, seen


def _free_engine_ms(policy: GlobalScheduler, decision: Decision, request: RequestInfo,
                    now_s: float) -> float | None:
    """The earliest predicted first token for this long prompt on an engine that has no long
    prompt outstanding, other than the one it is booked on; None if there is none."""
    stale_s = policy.config.stale_after_s
    n = request.prompt_len
    lane: Lane = "long"
    best = np.inf
    if policy.config.disaggregation and not request.one_engine:
        work = policy.prefill.work
        free = (policy.prefill.live(now_s, stale_s) & policy.lane_mask(lane)
                & (work.num_long == 0))
        free &= other_than(policy.prefill.ids, decision.prefill_replica)
        if free.any():
            ms = policy.prefill.first_token_ms(n, lane, now_s) + policy.handoff.first_ms \
                + policy.handoff.transfer_ms(n)
            best = min(best, float(ms[free].min()))
    d_live = policy.decode.live(now_s, stale_s)
    p_live = policy.prefill.live(now_s, stale_s) if policy.config.disaggregation \
        else np.zeros(len(policy.prefill.ids), dtype=bool)
    if policy.config.disaggregation:  # a decode replica prefills it if it may (room, budget)
        local = policy.can_local(request, d_live, now_s)
    else:
        local = d_live & policy.decode.room(n + request.max_tokens)
    local &= (policy.decode.work.num_long == 0)
    local &= other_than(policy.decode.ids,
                        decision.decode_replica if decision.mode == "local" else None)
    if local.any():
        local_ms = policy.decode.first_token_ms(n, lane, now_s)
        if p_live.any():
            # leaving the prefill pool for a decode replica moves the long prefill's cost to
            # the short prompts with it (isolation.py), as the choice on arrival counts it
            p_cost, d_cost = short_cost_ms(policy.prefill, policy.decode, p_live, d_live, n,
                                           policy.short_arrivals.per_s(now_s), now_s)
            here = policy.prefill.index.get(decision.prefill_replica or "")
            local_ms = local_ms + d_cost - (p_cost[here] if here is not None else 0.0)
        best = min(best, float(local_ms[local].min()))
    return None if best == np.inf else best
