"""The global scheduler's rules, one by one (pure Python: no Ray, no engine)."""

from __future__ import annotations

import pytest

from runtime.scheduler.lanes import LaneQueues
from runtime.scheduler.loads import DecodeTable, PrefillTable
from runtime.scheduler.policy import GlobalScheduler, PolicyConfig
from runtime.scheduler.types import Decision, DecodeLoad, PrefillLoad, Rejection, RequestInfo

NOW = 100.0


def _scheduler(num_short=2, num_long=1, num_decode=2, decode_blocks=1000, tps=10_000.0,
               decode_tps=5_000.0, **config) -> GlobalScheduler:
    lanes = ["short"] * num_short + ["long"] * num_long
    prefill = PrefillTable([f"p{i}" for i in range(len(lanes))], lanes, tps)
    decode = DecodeTable([f"d{i}" for i in range(num_decode)], [decode_blocks] * num_decode,
                         block_size=16, max_num_seqs=8, default_tokens_per_s=decode_tps)
    for i, lane in enumerate(lanes):
        prefill.report(PrefillLoad(f"p{i}", lane, 0, tps, NOW))
    return GlobalScheduler(PolicyConfig(**{"local_max_prompt_tokens": 0, **config}), prefill,
                           decode)


def _req(n: int, prompt_len: int, max_tokens: int = 16) -> RequestInfo:
    return RequestInfo(f"r{n}", prompt_len, max_tokens, NOW)


def test_long_prompts_go_to_long_replicas_only():
    sched = _scheduler(long_prompt_tokens=4096)
    decision = sched.decide(_req(0, 8000), NOW)
    assert isinstance(decision, Decision)
    assert decision.lane == "long" and decision.prefill_replica == "p2"
    short = sched.decide(_req(1, 100), NOW)
    assert short.lane == "short" and short.prefill_replica in ("p0", "p1")


def test_short_requests_wait_no_longer_when_long_ones_arrive():
    sched = _scheduler()
    before = sched.decide(_req(0, 200), NOW).predicted_ttft_ms
    for i in range(20):
        sched.decide(_req(100 + i, 30_000), NOW)  # a wave of long prompts
    # the short lane's replicas are untouched: the next short request (on the other short
    # replica) is predicted exactly as fast as the first
    after = sched.decide(_req(1, 200), NOW).predicted_ttft_ms
    assert after == pytest.approx(before)


def test_dispatches_count_before_the_next_report():
    sched = _scheduler(num_short=4, num_long=0)
    chosen = [sched.decide(_req(i, 1000), NOW).prefill_replica for i in range(8)]
    assert sorted(chosen) == ["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3"]


def test_a_stale_report_is_not_trusted():
    sched = _scheduler(num_short=2, num_long=0, stale_after_s=2.0)
    for i in range(5):  # 5 prompts we sent to p0 ourselves
        sched.prefill.dispatched(0, 2000)
    # p0's last report (long ago) said it was idle; p1 reports 3,000 pending tokens now
    sched.prefill.report(PrefillLoad("p0", "short", 0, 10_000.0, NOW - 60))
    sched.prefill.report(PrefillLoad("p1", "short", 3000, 10_000.0, NOW))
    assert sched.decide(_req(0, 100), NOW).prefill_replica == "p1"
    # a fresh report from p0 is believed again
    sched.prefill.report(PrefillLoad("p0", "short", 0, 10_000.0, NOW))
    assert sched.decide(_req(1, 100), NOW).prefill_replica == "p0"


def test_measured_throughput_steers_choice():
    sched = _scheduler(num_short=2, num_long=0)
    sched.prefill.report(PrefillLoad("p0", "short", 5000, 10_000.0, NOW))
    sched.prefill.report(PrefillLoad("p1", "short", 5000, 10_000.0, NOW))
    for _ in range(20):
        sched.prefill.finished("p1", 4000, 0.1)  # p1 measures 40K tokens/s
    assert sched.decide(_req(0, 100), NOW).prefill_replica == "p1"


@pytest.mark.parametrize(
    ("prompt_len", "decode_tps", "busy", "mode"),
    [
        (64, 50_000.0, False, "local"),  # short prompt, fast idle decode replica
        (2000, 50_000.0, False, "disaggregated"),  # above local_max_prompt_tokens
        (64, 50_000.0, True, "disaggregated"),  # decode replica has no room now
        (400, 500.0, False, "disaggregated"),  # decode replica too slow to prefill it
    ],
)
def test_local_versus_disaggregated(prompt_len, decode_tps, busy, mode):
    sched = _scheduler(num_decode=1, local_max_prompt_tokens=512)
    # the decode replica's measured prefill speed, and whether it has room right now
    sched.decode.report(DecodeLoad("d0", 0 if busy else 1000, 16, 8 if busy else 0, 8,
                                   decode_tps, NOW))
    decision = sched.decide(_req(0, prompt_len), NOW)
    assert isinstance(decision, Decision)
    assert decision.mode == mode, decision.reason
    assert (decision.prefill_replica is None) == (mode == "local")


def test_decode_placement_respects_kv_capacity():
    sched = _scheduler(num_decode=2, decode_blocks=100)
    sched.decode.total_blocks[0] = 10  # d0 can never hold 50 blocks
    sched.decode.free_blocks[0] = 10
    decision = sched.decide(_req(0, 700, max_tokens=100), NOW)  # 50 blocks
    assert decision.decode_replica == "d1"
    assert isinstance(sched.decide(_req(1, 3000, max_tokens=100), NOW), Rejection)


def test_decode_placement_prefers_room_then_fewest_sequences():
    sched = _scheduler(num_decode=3, decode_blocks=100)
    sched.decode.report(DecodeLoad("d0", 5, 16, 2, 8, 5000.0, NOW))  # too full right now
    sched.decode.report(DecodeLoad("d1", 90, 16, 5, 8, 5000.0, NOW))
    sched.decode.report(DecodeLoad("d2", 60, 16, 1, 8, 5000.0, NOW))
    assert sched.decide(_req(0, 100), NOW).decode_replica == "d2"


def test_admission_rejects_what_would_miss_the_slo():
    sched = _scheduler(num_short=1, num_long=0, admission_ttft_ms=500.0)
    sched.prefill.report(PrefillLoad("p0", "short", 20_000, 10_000.0, NOW))  # 2 s queued
    rejection = sched.decide(_req(0, 1000), NOW)
    assert isinstance(rejection, Rejection)
    assert rejection.retry_after_s == pytest.approx(1.6, abs=0.01)
    sched.prefill.report(PrefillLoad("p0", "short", 0, 10_000.0, NOW))
    assert isinstance(sched.decide(_req(1, 1000), NOW), Decision)


def test_admission_is_off_by_default():
    sched = _scheduler(num_short=1, num_long=0)
    sched.prefill.report(PrefillLoad("p0", "short", 10**7, 10_000.0, NOW))
    assert isinstance(sched.decide(_req(0, 1000), NOW), Decision)


def test_lane_by_latency_budget():
    sched = _scheduler(long_prompt_tokens=100_000, long_prefill_ms=200.0, tps=10_000.0)
    assert sched.lane(1999) == "short" and sched.lane(2000) == "long"


def test_no_request_starves_behind_the_other_lane():
    queues = LaneQueues(max_pass_overs=3)
    queues.push(_req(0, 50_000), "long")
    for i in range(10):
        queues.push(_req(i + 1, 100), "short")
    order = [queues.pop()[0].request_id for _ in range(5)]
    assert order[:3] == ["r1", "r2", "r3"] and order[3] == "r0"
    assert len(queues) == 6


def test_unmeasured_decode_replicas_are_assumed_as_fast_as_the_prefill_pool():
    sched = _scheduler(num_decode=1, local_max_prompt_tokens=512, decode_tps=1.0)
    decision = sched.decide(_req(0, 100), NOW)
    assert decision.mode == "local", decision.reason
    sched.decode.local_prefill_finished(0, 100, 1.0)  # too short to measure throughput by
    assert sched.decide(_req(1, 100), NOW).mode == "local"
    sched.decode.local_prefill_finished(0, 400, 4.0)  # measured: 100 tokens/s, very slow
    assert sched.decide(_req(2, 100), NOW).mode == "disaggregated"


def test_colocated_serving_is_always_local_on_the_least_loaded_engine():
    sched = _scheduler(num_short=0, num_long=0, num_decode=2, disaggregation=False,
                       local_max_prompt_tokens=0)
    first = sched.decide(_req(0, 8000), NOW)  # long: still local, no prefill pool
    assert isinstance(first, Decision)
    assert first.mode == "local" and first.prefill_replica is None
    # the engine prefilling 8,000 tokens is the loaded one: the next ones go to the other
    second = sched.decide(_req(1, 100), NOW)
    third = sched.decide(_req(2, 100), NOW)
    assert {second.decode_replica, third.decode_replica} == {"d0", "d1"} - {
        first.decode_replica}
    # once its prefill is done, sequences decide: d(first) has 1, the other has 2
    sched.decode.local_prefill_finished(sched.decode.index[first.decode_replica], 8000, 1.0)
    sched.decode.local_prefill_finished(sched.decode.index[second.decode_replica], 200, 0.1)
    assert sched.decide(_req(3, 100), NOW).decode_replica == first.decode_replica


def test_colocated_admission_uses_the_local_prediction():
    sched = _scheduler(num_short=0, num_long=0, disaggregation=False, admission_ttft_ms=500.0,
                       decode_tps=1000.0)
    assert isinstance(sched.decide(_req(0, 400), NOW), Decision)
    rejected = sched.decide(_req(1, 900), NOW)  # 900 tokens at 1,000 tokens/s > 500 ms
    assert isinstance(rejected, Rejection) and rejected.retry_after_s > 0
