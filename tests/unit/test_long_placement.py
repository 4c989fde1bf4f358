"""The global scheduler's rules for long prompts: which engine starts one, when it waits its
turn, what it costs the short prompts (pure Python: no Ray, no engine)."""

from __future__ import annotations

import time

import pytest

from runtime.scheduler.policy import GlobalScheduler, PolicyConfig
from runtime.scheduler.types import Decision
from runtime.scheduler.work import MAX_PROGRESS, MAX_SLOWDOWN
from tests.unit.test_scheduler_policy import MODEL, NOW, _req, _scheduler


def _one_each() -> GlobalScheduler:
    """One prefill and one decode replica, local prefills of any length, long from 1,024."""
    return _scheduler(num_short=1, num_long=0, num_decode=1, local_max_prompt_tokens=None,
                      long_prompt_tokens=1024)


def _decide(sched: GlobalScheduler, prompt_len: int, now: float = NOW) -> Decision:
    decision = sched.decide(_req(0, prompt_len), now)
    assert isinstance(decision, Decision)
    return decision


def test_a_long_prompt_goes_to_the_engine_that_starts_it_first():
    sched = _one_each()
    sched.prefill.work.book(0, "busy", "long", 6000, NOW)  # p0 is busy for ~0.7 s
    first = sched.decide(_req(0, 6000), NOW)
    assert first.mode == "local", first.reason  # d0 starts it now
    second = sched.decide(_req(1, 6000), NOW)  # both busy: the sooner, p0
    assert second.mode != "local" and second.prefill_replica == "p0", second.reason


def test_a_long_prompt_waits_its_turn_when_short_prompts_need_an_engine_free_of_long_ones():
    def decide(shorts_per_s: float) -> Decision:
        sched = _one_each()
        sched.prefill.work.book(0, "busy", "long", 6000, NOW)  # p0 busy for ~0.7 s
        for i in range(int(shorts_per_s * 30)):  # 30 s of short arrivals
            sched.short_arrivals.arrived(NOW - 30 + i / shorts_per_s)
        assert sched.short_arrivals.per_s(NOW) == pytest.approx(shorts_per_s, rel=0.1)
        return _decide(sched, 6000)

    # few short prompts: d0 starts the long one now, 0.7 s sooner than p0 would
    assert decide(1.0).mode == "local"
    # many: while both engines prefilled long prompts, each of the ~15 short prompts arriving
    # meanwhile would wait for two of its chunks (~60 ms each): the long one waits on p0
    waited = decide(25.0)
    assert waited.mode != "local" and waited.prefill_replica == "p0", waited.reason


def test_a_long_prompt_keeps_off_an_engine_whose_short_prompts_are_still_prefilling():
    """vLLM schedules a chunk of a long prompt into the steps of the short prompts still
    prefilling on its engine, each of which then waits about a chunk longer: a long prompt
    that an idle decode replica would start as soon as the idle prefill replica goes local
    only when no short prompt is prefilling there."""
    def decide(num_short: int) -> Decision:
        sched = _one_each()
        for i in range(num_short):  # sent a second ago: little of their work is left
            sched.decode.work.book(0, f"s{i}", "short", 100, NOW - 1.0)
        return _decide(sched, 2000)

    assert decide(0).mode == "local"
    two = decide(2)
    assert two.mode != "local" and two.prefill_replica == "p0", two.reason


def test_a_long_prefill_past_its_prediction_is_expected_to_run_as_long_again():
    """Its progress is unknown; an engine that ran it slower than predicted (a stall, or what
    shares the engine) is expected to go on so: a late long prefill is expected to take as
    long again as it is late, up to MAX_SLOWDOWN times its prediction in all. A long prompt
    that would wait its turn behind it on time goes to the idle decode replica once it is
    late."""
    def decide(late_s: float) -> tuple[Decision, float]:
        sched = _one_each()
        predicted = sched.prefill.work.book(0, "busy", "long", 6000, NOW)
        now = NOW + predicted / 1e3 + late_s
        for i in range(750):  # 30 s of short prompts, 25 a second
            sched.short_arrivals.arrived(now - 30 + i / 25)
        left = float(sched.prefill.work.remaining_ms(now)[1][0])
        return _decide(sched, 6000, now), left - (1 - MAX_PROGRESS) * predicted

    on_time, extra = decide(0.0)
    assert on_time.mode != "local" and extra == pytest.approx(0.0, abs=1.0), on_time.reason
    late, extra = decide(2.0)
    assert late.mode == "local" and extra == pytest.approx(2000.0, rel=0.01), late.reason
    _, extra = decide(60.0)  # an engine slower than MAX_SLOWDOWN is not believed
    assert extra == pytest.approx((MAX_SLOWDOWN - 1) * MODEL.predict_ms(6000), rel=0.01)


def test_long_prompts_go_to_an_engine_one_at_a_time_in_booking_order():
    import asyncio

    from runtime.scheduler.live import LiveConfig, LiveScheduler
    from runtime.scheduler.types import ReplicaReport

    async def run() -> list[str]:
        live = LiveScheduler(LiveConfig(PolicyConfig(long_prompt_tokens=1000,
                                                     local_max_prompt_tokens=0), 0, 16, 8))
        now = time.time()
        live.report(ReplicaReport("prefill", "p0", 0, 0, 0, 0, 0, 0, now))
        live.report(ReplicaReport("decode", "d0", 0, 1000, 1000, 16, 0, 8, now))
        order: list[str] = []
        decisions = {rid: live.decide(rid, 5000, 16) for rid in ("a", "b", "c")}
        short = live.decide("s", 100, 16)

        async def send(rid: str) -> None:
            await live.turn(decisions.get(rid, short), rid, 100 if rid == "s" else 5000, 16)
            order.append(rid)

        tasks = [asyncio.ensure_future(send(rid)) for rid in ("c", "b", "s", "a")]
        await asyncio.sleep(0.01)
        assert order == ["s", "a"]  # the short one at once; only the first long one
        live.first_token(decisions["a"], "a")
        await asyncio.sleep(0.01)
        assert order == ["s", "a", "b"]
        live.request_done(decisions["b"], "b", 5000, 16)  # b ends (e.g. its client left)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(run()) == ["s", "a", "b", "c"]
