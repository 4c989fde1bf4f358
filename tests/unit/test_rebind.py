"""Late binding: a long prompt waiting for its turn moves when its engine is late or another
engine is clearly earlier (runtime/scheduler/rebind.py); pure Python, explicit clocks."""

from __future__ import annotations

import asyncio
import time

from runtime.scheduler.live import LiveConfig, LiveScheduler
from runtime.scheduler.loads import DecodeTable, PrefillTable
from runtime.scheduler.policy import GlobalScheduler, PolicyConfig
from runtime.scheduler.prefill_model import PrefillModel
from runtime.scheduler.rebind import move_reason
from runtime.scheduler.types import Decision, Engine, ReplicaReport, RequestInfo

NOW = 100.0
MODEL = PrefillModel(1.0, 0.05, 1e-5)  # 5,000 tokens: 501 ms


def _two_prefill_replicas() -> GlobalScheduler:
    prefill = PrefillTable(["p0", "p1"], ["short", "short"], MODEL)
    decode = DecodeTable(["d0"], [1000], block_size=16, max_num_seqs=8, prior=MODEL)
    config = PolicyConfig(long_prompt_tokens=1000, local_max_prompt_tokens=0)
    return GlobalScheduler(config, prefill, decode)


def _three_longs(sched: GlobalScheduler) -> tuple[dict[str, Decision], RequestInfo]:
    """a and b start on p0 and p1; c waits behind one of them."""
    decisions = {}
    for rid in ("a", "b", "c"):
        decision = sched.decide(RequestInfo(rid, 5000, 16, NOW), NOW)
        assert isinstance(decision, Decision) and decision.lane == "long"
        decisions[rid] = decision
    assert {decisions["a"].prefill_replica, decisions["b"].prefill_replica} == {"p0", "p1"}
    return decisions, RequestInfo("c", 5000, 16, NOW)


def _ahead_of_c(decisions: dict[str, Decision]) -> tuple[str, str]:
    """(the long prompt c waits for, the one on the other engine)"""
    same = "a" if decisions["a"].prefill_replica == decisions["c"].prefill_replica else "b"
    return same, "b" if same == "a" else "a"


def test_it_stays_while_its_engine_keeps_to_the_prediction():
    sched = _two_prefill_replicas()
    decisions, c = _three_longs(sched)
    assert move_reason(sched, decisions["c"], c, NOW + 0.1) is None  # both engines busy
    _, other = _ahead_of_c(decisions)
    sched.first_token(decisions[other], other, NOW + 0.48)
    # the other engine is free, but the one ahead of c is nearly done: no clear win
    assert move_reason(sched, decisions["c"], c, NOW + 0.48) is None


def test_it_moves_when_another_engine_is_free_and_clearly_earlier():
    sched = _two_prefill_replicas()
    decisions, c = _three_longs(sched)
    _, other = _ahead_of_c(decisions)
    sched.first_token(decisions[other], other, NOW + 0.05)  # finished far earlier than predicted
    reason = move_reason(sched, decisions["c"], c, NOW + 0.05)
    assert reason is not None and "no long prompt" in reason


def test_it_moves_when_the_long_prefill_ahead_is_late():
    sched = _two_prefill_replicas()
    decisions, c = _three_longs(sched)
    _, other = _ahead_of_c(decisions)
    sched.first_token(decisions[other], other, NOW + 0.5)
    # 2 s after it started, the 501 ms prefill ahead of c is 1.5 s late
    reason = move_reason(sched, decisions["c"], c, NOW + 2.0)
    assert reason is not None and "late" in reason


def test_a_moved_prompt_is_booked_on_the_free_engine_and_released_from_the_old_one():
    async def run() -> None:
        live = LiveScheduler(LiveConfig(PolicyConfig(long_prompt_tokens=1000,
                                                     local_max_prompt_tokens=0), 0, 16, 8))
        now = time.time()
        for rid in ("p0", "p1"):
            live.report(ReplicaReport("prefill", rid, 0, 0, 0, 0, 0, 0, now))
        live.report(ReplicaReport("decode", "d0", 0, 1000, 1000, 16, 0, 8, now))
        decisions = {rid: live.decide(rid, 5000, 16) for rid in ("a", "b", "c")}
        c = decisions["c"]
        assert isinstance(c, Decision)
        same, other = _ahead_of_c(decisions)  # type: ignore[arg-type]
        waiting = asyncio.ensure_future(live.turn(c, "c", 5000, 16))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        live.first_token(decisions[other], other)  # type: ignore[arg-type]
        moved = await asyncio.wait_for(waiting, 2.0)
        assert isinstance(moved, Decision)
        assert moved.prefill_replica == decisions[other].prefill_replica  # type: ignore[union-attr]
        assert "moved" in moved.reason and live.num_moved == 1
        # c is off the old engine's books: only the long prompt ahead of it is left there
        old = live.prefill.index[c.prefill_replica or ""]
        assert live.prefill.work.num_long[old] == 1
        live.request_done(moved, "c", 5000, 16)
        live.request_done(decisions[same], same, 5000, 16)  # type: ignore[arg-type]
        live.request_done(decisions[other], other, 5000, 16)  # type: ignore[arg-type]
        assert live.decode.booked_seqs.sum() == 0 and live.prefill.work.num_long.sum() == 0
        assert sum(live.decisions.values()) == 3

    asyncio.run(run())


def test_a_prompt_held_long_says_why_it_stayed():
    async def run() -> None:
        # one prefill replica, no local prefills: c waits behind a, with nowhere to move
        live = LiveScheduler(LiveConfig(PolicyConfig(long_prompt_tokens=1000,
                                                     local_max_prompt_tokens=0), 0, 16, 8))
        now = time.time()
        live.report(ReplicaReport("prefill", "p0", 0, 0, 0, 0, 0, 0, now))
        live.report(ReplicaReport("decode", "d0", 0, 1000, 1000, 16, 0, 8, now))
        a, c = (live.decide(rid, 5000, 16) for rid in ("a", "c"))
        assert isinstance(a, Decision) and isinstance(c, Decision)
        waiting = asyncio.ensure_future(live.turn(c, "c", 5000, 16))
        await asyncio.sleep(0.6)  # past HELD_NOTE_MS, and at least one look
        live.first_token(a, "a")
        turn = await asyncio.wait_for(waiting, 2.0)
        assert isinstance(turn, Decision) and Engine.of(turn) == Engine.of(c)
        assert turn.reason.startswith(c.reason) and "; held " in turn.reason
        assert "predicted here, no other engine without a long prompt" in turn.reason
        assert live.num_moved == 0

    asyncio.run(run())


def test_under_disaggregation_it_stays_when_no_decode_replica_may_prefill_it():
    prefill = PrefillTable(["p0"], ["short"], MODEL)
    decode = DecodeTable(["d0"], [1000], block_size=16, max_num_seqs=8, prior=MODEL)
    sched = GlobalScheduler(PolicyConfig(long_prompt_tokens=1000, local_max_prompt_tokens=999),
                            prefill, decode)  # no local prefill of a prompt over 999 tokens
    decisions = {rid: sched.decide(RequestInfo(rid, 5000, 16, NOW), NOW) for rid in "ac"}
    assert all(d.prefill_replica == "p0" for d in decisions.values())  # type: ignore[union-attr]
    # d0 idles and the prefill ahead of c is 1.5 s late, but d0 may not prefill c
    assert move_reason(sched, decisions["c"], RequestInfo("c", 5000, 16, NOW),  # type: ignore[arg-type]
                       NOW + 2.0) is None


def test_under_disaggregation_it_moves_to_a_decode_replica_free_of_long_work():
    # 1. a prefills on d0 (local), b and c split on p0: c waits for b
    prefill = PrefillTable(["p0"], ["short"], MODEL)
    decode = DecodeTable(["d0"], [4000], block_size=16, max_num_seqs=8, prior=MODEL)
    sched = GlobalScheduler(PolicyConfig(long_prompt_tokens=1000), prefill, decode)
    decisions = {rid: sched.decide(RequestInfo(rid, 5000, 1000, NOW), NOW) for rid in "abc"}
    a, b, c = decisions["a"], decisions["b"], decisions["c"]
    assert isinstance(a, Decision) and a.mode == "local"
    assert isinstance(b, Decision) and isinstance(c, Decision)
    assert b.prefill_replica == "p0"
    assert c.prefill_replica == "p0" and not sched.prefill.work.has_turn("c")
    info = RequestInfo("c", 5000, 1000, NOW)
    # 2. a's first token: d0 has no long work, but b is on time and c's turn is near
    sched.first_token(a, "a", NOW + 0.3)
    assert move_reason(sched, c, info, NOW + 0.6) is None
    # 3. b runs 1.5 s past its prediction: c moves, to a local prefill on d0
    reason = move_reason(sched, c, info, NOW + 2.0)
    assert reason is not None and "late" in reason
    sched.prefill.work.finished("c")  # released from p0, as LiveScheduler.turn does
    moved = sched.decide(info, NOW + 2.0, avoid=Engine.of(c))
    assert isinstance(moved, Decision) and moved.mode == "local" and moved.decode_replica == "d0"
    assert sched.decode.work.has_turn("c")


def test_under_colocated_serving_it_moves_to_another_engine():
    prefill = PrefillTable([], [], MODEL)
    decode = DecodeTable(["d0", "d1"], [1000, 1000], block_size=16, max_num_seqs=8,
                         prior=MODEL)
    sched = GlobalScheduler(PolicyConfig(long_prompt_tokens=1000, disaggregation=False),
                            prefill, decode)
    decisions = {rid: sched.decide(RequestInfo(rid, 5000, 16, NOW), NOW) for rid in "abc"}
    c = decisions["c"]
    assert isinstance(c, Decision) and c.mode == "local"
    other = "a" if decisions["a"].decode_replica != c.decode_replica else "b"  # type: ignore[union-attr]
    sched.first_token(decisions[other], other, NOW + 0.05)  # type: ignore[arg-type]
    reason = move_reason(sched, c, RequestInfo("c", 5000, 16, NOW), NOW + 0.05)
    assert reason is not None
    sched.first_token(c, "c", NOW + 0.05)  # its prefill booking leaves c's engine
    moved = sched.decide(RequestInfo("c", 5000, 16, NOW), NOW + 0.05,
                         avoid=Engine.of(c))
    assert isinstance(moved, Decision) and moved.decode_replica != c.decode_replica
