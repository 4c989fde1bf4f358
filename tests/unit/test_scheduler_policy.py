"""The global scheduler's rules, one by one (pure Python: no Ray, no engine)."""

from __future__ import annotations

import pytest

from runtime.scheduler.loads import DecodeTable, PrefillTable
from runtime.scheduler.policy import GlobalScheduler, PolicyConfig
from runtime.scheduler.prefill_model import PrefillModel
from runtime.scheduler.types import Decision, DecodeLoad, PrefillLoad, Rejection, RequestInfo

NOW = 100.0
# 1 ms + 0.05 ms/token + quadratic: 1K tokens 61 ms, 8K 1.1 s (the tiny model's shape)
MODEL = PrefillModel(1.0, 0.05, 1e-5)


def _scheduler(num_short=2, num_long=1, num_decode=2, decode_blocks=1000, model=MODEL,
               decode_model=None, **config) -> GlobalScheduler:
    lanes = ["short"] * num_short + ["long"] * num_long
    prefill = PrefillTable([f"p{i}" for i in range(len(lanes))], lanes, model)
    decode = DecodeTable([f"d{i}" for i in range(num_decode)], [decode_blocks] * num_decode,
                         block_size=16, max_num_seqs=8, prior=decode_model or model)
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


def test_predicted_prefill_is_quadratic_in_the_prompt():
    sched = _scheduler(num_short=1, num_long=0)
    t1k = sched.decide(_req(0, 1000), NOW).predicted_prefill_ms
    t8k = sched.decide(_req(1, 8000), NOW + 100).predicted_prefill_ms
    assert t1k == pytest.approx(MODEL.predict_ms(1000))
    assert t8k > 15 * t1k  # 8x the tokens, far more than 8x the time


def test_short_prompts_wait_for_short_work_and_one_chunk_per_step_of_a_long_prefill():
    sched = _scheduler(num_short=1, num_long=0, long_prompt_tokens=4096)
    alone = sched.decide(_req(0, 200), NOW).predicted_ttft_ms
    sched.first_token(Decision("short", "disaggregated", "p0", "d0", 0, ""), "r0")
    sched.decide(_req(1, 8000), NOW)  # a 1.1 s long prefill now runs on p0
    short = sched.decide(_req(2, 200), NOW + 0.1).predicted_ttft_ms
    long_remaining = MODEL.predict_ms(8000) - 100
    # the short prompt shares a couple of steps with 512-token chunks of the long one: far
    # less than the long prefill's remaining second
    assert alone < short < alone + 0.3 * long_remaining
    # a second long prompt waits for all of the first
    second_long = sched.decide(_req(3, 8000), NOW + 0.1).predicted_ttft_ms
    assert second_long > long_remaining + MODEL.predict_ms(8000) - 1


def test_dispatches_count_before_the_next_report():
    sched = _scheduler(num_short=4, num_long=0)
    chosen = [sched.decide(_req(i, 1000), NOW).prefill_replica for i in range(8)]
    assert sorted(chosen) == ["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3"]


def test_remaining_work_shrinks_as_the_engine_works_and_clears_at_the_first_token():
    sched = _scheduler(num_short=1, num_long=0)
    decision = sched.decide(_req(0, 4000), NOW)
    predicted = decision.predicted_prefill_ms
    short, long_ = sched.prefill.work.remaining_ms(NOW + predicted / 2e3)
    assert short[0] + long_[0] == pytest.approx(predicted / 2, rel=0.01)
    assert sched.first_token(decision, "r0") is True  # ran alone: a clean sample
    assert sched.prefill.work.remaining_ms(NOW + 1)[0][0] == 0
    assert sched.first_token(decision, "r0") is None  # already cleared


def test_a_prefill_that_shared_its_engine_is_no_sample_for_the_model():
    sched = _scheduler(num_short=1, num_long=0)
    first = sched.decide(_req(0, 1000), NOW)
    sched.decide(_req(1, 1000), NOW)
    assert sched.first_token(first, "r0") is False


def test_measured_prefill_times_refit_the_replicas_model():
    sched = _scheduler(num_short=2, num_long=0)
    slow = PrefillModel(2.0, 0.2, 4e-5)  # p1 is four times slower than believed
    sched.prefill.work.learn(1, [(n, slow.predict_ms(n)) for n in (100, 1000, 4000, 8000)])
    assert sched.prefill.work.model(1).predict_ms(2000) == pytest.approx(
        slow.predict_ms(2000), rel=0.02)
    chosen = {sched.decide(_req(i, 1000), NOW).prefill_replica for i in range(3)}
    assert chosen == {"p0"}  # p0 finishes three 1K prompts before p1 finishes one


@pytest.mark.parametrize(
    ("prompt_len", "decode_model", "busy", "limit", "mode"),
    [
        (64, MODEL, False, None, "local"),  # short prompt, idle decode replica
        (2000, MODEL, False, 512, "disaggregated"),  # above local_max_prompt_tokens
        (64, MODEL, True, None, "disaggregated"),  # decode replica has no room now
        (400, PrefillModel(50, 1.0, 1e-3), False, None, "disaggregated"),  # too slow
    ],
)
def test_local_versus_disaggregated(prompt_len, decode_model, busy, limit, mode):
    sched = _scheduler(num_decode=1, decode_model=decode_model, local_max_prompt_tokens=limit)
    sched.decode.report(DecodeLoad("d0", 0 if busy else 1000, 16, 8 if busy else 0, 8, NOW))
    decision = sched.decide(_req(0, prompt_len), NOW)
    assert isinstance(decision, Decision)
    assert decision.mode == mode, decision.reason
    assert (decision.prefill_replica is None) == (mode == "local")


def test_local_prefills_stay_within_the_decode_replicas_tpot_budget():
    sched = _scheduler(num_short=1, num_long=0, num_decode=1, local_max_prompt_tokens=None,
                       tpot_budget_ms=50.0, long_prompt_tokens=2000)
    sched.prefill.work.book(0, "busy", "short", 1500, NOW)  # p0 is busy for ~100 ms
    for _ in range(4):  # four sequences decoding on d0, 64 tokens each, halfway through
        sched.decode.placed(0, 10, 64)
    sched.decode.progressed("d0", 4 * 32, 4 * 0.5)
    sched.decode.tpot_ms[0] = 45.0  # 5 ms of slack per token left
    assert sched.decide(_req(0, 500), NOW).mode == "local"  # 29 ms of prefill work
    # now (4 x 32 + 16) / 5 = 29 tokens left per sequence x 5 ms = 144 ms; 29 + 123 ms of
    # prefill would exceed it
    assert sched.decide(_req(1, 1800), NOW).mode == "disaggregated"
    sched.decode.tpot_ms[0] = 10.0  # decoding fast: plenty of budget
    assert sched.decide(_req(2, 1800), NOW).mode == "local"


def test_decode_placement_respects_kv_capacity():
    sched = _scheduler(num_decode=2, decode_blocks=100)
    sched.decode.total_blocks[0] = 10  # d0 can never hold 50 blocks
    sched.decode.free_blocks[0] = 10
    decision = sched.decide(_req(0, 700, max_tokens=100), NOW)  # 50 blocks
    assert decision.decode_replica == "d1"
    assert isinstance(sched.decide(_req(1, 3000, max_tokens=100), NOW), Rejection)


def test_decode_placement_prefers_room_then_fewest_sequences():
    sched = _scheduler(num_decode=3, decode_blocks=100)
    sched.decode.report(DecodeLoad("d0", 5, 16, 2, 8, NOW))  # too full right now
    sched.decode.report(DecodeLoad("d1", 90, 16, 5, 8, NOW))
    sched.decode.report(DecodeLoad("d2", 60, 16, 1, 8, NOW))
    assert sched.decide(_req(0, 100), NOW).decode_replica == "d2"


def test_admission_rejects_what_would_miss_the_slo():
    sched = _scheduler(num_short=1, num_long=0, admission_ttft_ms=500.0)
    sched.prefill.work.book(0, "r0", "long", 8000, NOW)  # 1.1 s of long work on p0
    rejection = sched.decide(_req(1, 8000), NOW)
    assert isinstance(rejection, Rejection)
    assert rejection.retry_after_s == pytest.approx(
        (2 * MODEL.predict_ms(8000) + 5.0 - 500.0) / 1e3, rel=0.01)
    assert isinstance(sched.decide(_req(2, 1000), NOW), Decision)  # short: not behind it


def test_admission_is_off_by_default():
    sched = _scheduler(num_short=1, num_long=0)
    for i in range(20):
        sched.decide(_req(i, 8000), NOW)
    assert isinstance(sched.decide(_req(99, 8000), NOW), Decision)


def test_lane_by_latency_budget():
    sched = _scheduler(long_prompt_tokens=100_000, long_prefill_ms=200.0)
    boundary = next(n for n in range(1, 10_000) if MODEL.predict_ms(n) >= 200.0)
    assert sched.lane(boundary - 1) == "short" and sched.lane(boundary) == "long"


def test_colocated_serving_is_always_local_on_the_earliest_engine():
    sched = _scheduler(num_short=0, num_long=0, num_decode=2, disaggregation=False)
    first = sched.decide(_req(0, 8000), NOW)  # long: still local, no prefill pool
    assert isinstance(first, Decision)
    assert first.mode == "local" and first.prefill_replica is None
    # the engine prefilling 8,000 tokens is the loaded one: the next ones go to the other
    second = sched.decide(_req(1, 100), NOW)
    assert second.decode_replica != first.decode_replica
    # once the long prefill is done, the first engine is the free one again
    sched.first_token(first, "r0")
    third = sched.decide(_req(2, 100), NOW)
    assert third.decode_replica == first.decode_replica


def test_colocated_admission_uses_the_local_prediction():
    sched = _scheduler(num_short=0, num_long=0, num_decode=1, disaggregation=False,
                       admission_ttft_ms=500.0)
    assert isinstance(sched.decide(_req(0, 400), NOW), Decision)
    rejected = sched.decide(_req(1, 8000), NOW)  # 1.1 s > 500 ms
    assert isinstance(rejected, Rejection) and rejected.retry_after_s > 0


def test_a_short_prompt_stays_off_an_engine_running_a_long_prefill_when_it_can():
    sched = _scheduler(num_short=1, num_long=0, num_decode=1, local_max_prompt_tokens=None,
                       long_prompt_tokens=4096)
    for _ in range(2):  # d0 decodes two sequences, 30 ms a step
        sched.decode.placed(0, 2, 16)
    sched.decode.report_decode_step(0, (26.0, 2.0))
    idle = sched.decide(_req(0, 600), NOW)
    assert idle.mode == "disaggregated", idle.reason  # p0 is idle and does it sooner
    sched.first_token(idle, "r0")
    sched.decide(_req(1, 8000), NOW)  # p0 runs a long prefill now
    during = sched.decide(_req(2, 600), NOW)
    # on p0 it would wait a chunk per step and push the long prefill back by its own time
    assert during.mode == "local", during.reason


def test_dead_stale_and_failed_replicas_are_not_chosen():
    sched = _scheduler(num_short=2, num_long=0, num_decode=2)
    for i in range(2):
        sched.prefill.report(PrefillLoad(f"p{i}", "short", 0, NOW))
        sched.decode.report(DecodeLoad(f"d{i}", 1000, 16, 0, 8, NOW))
    sched.prefill.report(PrefillLoad("p0", "short", 0, NOW, healthy=False))  # engine died
    sched.decode.report(DecodeLoad("d0", 1000, 16, 0, 8, NOW - 5.0))  # silent for 5 s
    for i in range(4):
        decision = sched.decide(_req(i, 1000), NOW)
        assert (decision.prefill_replica, decision.decode_replica) == ("p1", "d1")
    sched.replica_failed("prefill", "p1", NOW)  # a call to p1 failed: out at once
    degraded = sched.decide(_req(9, 1000), NOW)
    assert degraded.mode == "local" and degraded.decode_replica == "d1"
    assert "degraded" in degraded.reason
    sched.prefill.report(PrefillLoad("p1", "short", 0, NOW + 0.5))  # it reports again: back
    assert sched.decide(_req(10, 1000), NOW + 0.5).prefill_replica == "p1"


def test_without_decode_replicas_a_prefill_replica_serves_whole_requests():
    sched = _scheduler(num_short=1, num_long=0, num_decode=1)
    sched.decode.report(DecodeLoad("d0", 1000, 16, 0, 8, NOW, healthy=False))
    decision = sched.decide(_req(0, 300), NOW)
    assert decision.mode == "prefill_local" and decision.prefill_replica == "p0"
    assert decision.decode_replica == ""
    sched.prefill.report(PrefillLoad("p0", "short", 0, NOW, healthy=False))
    refused = sched.decide(_req(1, 300), NOW)
    assert isinstance(refused, Rejection) and refused.unavailable


def test_colocated_ties_go_to_the_engine_with_fewer_sequences():
    sched = _scheduler(num_short=0, num_long=0, num_decode=2, disaggregation=False)
    chosen = []
    for i in range(6):  # short prompts: equal predicted first tokens on both idle engines
        decision = sched.decide(_req(i, 64), NOW)
        sched.first_token(decision, f"r{i}")  # prefill done, the sequence keeps decoding
        chosen.append(decision.decode_replica)
    assert chosen.count("d0") == chosen.count("d1") == 3


def test_a_request_that_needs_one_engine_is_never_split():
    """Structured output (the grammar's state stays in its engine): local on a decode
    replica, or whole on a prefill replica (always for a long prompt, which would slow a
    decode replica's decodes all along), never disaggregated."""
    sched = _scheduler(num_short=1, num_long=0, num_decode=1, local_max_prompt_tokens=0,
                       long_prompt_tokens=4096)
    sched.prefill.total_blocks[0] = sched.prefill.free_blocks[0] = 1000

    def one_engine(n: int, prompt_len: int, now: float) -> Decision:
        decision = sched.decide(RequestInfo(f"s{n}", prompt_len, 16, now, one_engine=True),
                                now)
        assert isinstance(decision, Decision)
        return decision

    # a split-only config (no local prefills allowed) still runs it on one engine
    short = one_engine(0, 200, NOW)
    assert short.mode in ("local", "prefill_local") and "one engine" in short.reason
    other = sched.decide(_req(1, 200), NOW + 1)  # others may still split
    assert other.mode != "local" and "one engine" not in other.reason
    long_ = one_engine(2, 6000, NOW + 2)
    assert long_.mode == "prefill_local" and long_.prefill_replica == "p0"
    # the prefill replica is now busy with the long prompt: a short one goes to the decode
    # replica, which starts it sooner
    busy = one_engine(3, 200, NOW + 2)
    assert busy.mode == "local" and busy.decode_replica == "d0"
    # without a live prefill replica: local
    sched.prefill.report(PrefillLoad("p0", "short", 0, NOW + 3, healthy=False))
    assert one_engine(4, 6000, NOW + 3).mode == "local"


def test_a_long_prompt_beside_decodes_takes_a_step_per_chunk():
    # vLLM gives a prompt at most chunk_tokens (512) a step while others run: 6,000 tokens
    # take 12 steps, each with the decode batch in it, where alone they would take 3
    sched = _scheduler(num_decode=1)
    alone = float(sched.decode.first_token_ms(6000, "long", NOW)[0])
    sched.decode.placed(0, 10, 64)
    sched.decode.report_decode_step(0, (19.0, 1.0))  # its step: 20 ms with one sequence
    assert float(sched.decode.first_token_ms(6000, "long", NOW)[0]) == pytest.approx(
        alone + 12 * 20.0)
    assert float(sched.decode.first_token_ms(400, "short", NOW)[0]) == pytest.approx(
        float(sched.decode.work.wait_ms(NOW, 400, "short")[0]) + 20.0)  # one step


def test_a_measured_prefill_is_learned_without_the_decode_steps_it_shared():
    """The decode steps a prefill shares are predicted apart (decode_steps_ms): the engine's
    slowdown and its prefill model learn the prefill's own time, or they would count those
    steps twice."""
    sched = _scheduler(num_short=1, num_long=0, num_decode=1, local_max_prompt_tokens=None)
    for _ in range(2):  # d0 decodes two sequences, 30 ms a step
        sched.decode.placed(0, 2, 16)
    sched.decode.report_decode_step(0, (26.0, 2.0))
    sched.prefill.work.book(0, "busy", "long", 8000, NOW)  # p0 prefills a long prompt
    decision = sched.decide(_req(0, 400), NOW)
    assert decision.mode == "local", decision.reason
    assert decision.predicted_ttft_ms == pytest.approx(MODEL.predict_ms(400) + 30.0)
    sched.first_token(decision, "r0")
    sched.learn(decision, 400, MODEL.predict_ms(400) + 30.0, alone=True)  # as predicted
    assert sched.decode.work.slowdown[0] == pytest.approx(1.0)
    sched.learn(decision, 400, 2 * MODEL.predict_ms(400) + 30.0, alone=True)  # twice as slow
    assert sched.decode.work.slowdown[0] > 1.1


def test_a_sequence_has_its_tokens_not_yet_generated_left_to_decode():
    """What a prefill placed on an engine costs the sequences decoding there counts the
    tokens they still decode: all of a sequence's expected output while it prefills, then
    that less the tokens it generated (the ingress reports them as they stream); none once
    it left. The wait is priced by what it adds to the sequence's TPOT: over its own
    tokens, at the TTFT SLO / TPOT SLO rate."""
    from runtime.scheduler.decode_cost import prefill_delay_ms

    sched = _scheduler(num_short=0, num_long=0, num_decode=1, disaggregation=False,
                       long_prompt_tokens=1024)
    first = sched.decide(_req(0, 5000, 8), NOW)
    chunk_ms = MODEL.predict_ms(7000) * 512 / 7000  # a chunk of a 7,000-token prompt
    # 8 tokens ahead, a chunk each, over its 8 tokens: a chunk on its TPOT, priced x 10
    assert float(sched.decode.sequences_left()[0]) == pytest.approx(1.0)
    assert float(prefill_delay_ms(sched.decode, 7000, 1.0, 10.0)[0]) \
        == pytest.approx(10 * chunk_ms)
    sched.first_token(first, "r0")
    sched.decode.progressed("d0", 1, 1 / 8)  # its first token
    sched.decode.progressed("d0", 2, 2 / 8)
    assert float(sched.decode.tokens_left()[0]) == pytest.approx(5.0)
    assert float(sched.decode.sequences_left()[0]) == pytest.approx(5 / 8)
    assert float(prefill_delay_ms(sched.decode, 7000, 1.0, 10.0)[0]) \
        == pytest.approx(10 * 5 * chunk_ms / 8)
    sched.decode.progressed("d0", 5, 5 / 8)
    assert float(sched.decode.tokens_left()[0]) == 0.0
    assert float(prefill_delay_ms(sched.decode, 7000, 1.0, 10.0)[0]) == 0.0
    sched.decode.progressed("unknown", 3, 3 / 8)  # a replica gone since: nothing to count
    sched.decode.released("d0", 320, 8, num_generated=8)
    assert float(sched.decode.tokens_left()[0]) == 0.0
    assert sched.decode.decoded_tokens[0] == 0.0
    assert sched.decode.inverse_max_tokens[0] == sched.decode.fraction_decoded[0] == 0.0


def test_a_long_prefill_goes_where_it_adds_least_to_the_sequences_tpots():
    """A long prefill stalls every sequence on its engine for about its whole length. Two
    120-token sequences half done wait as long in all as one 23-token sequence, twice
    over, but each spreads it over five times the tokens: the prefill goes beside them
    (summed milliseconds would have sent it to the short sequence)."""
    sched = _scheduler(num_short=0, num_long=0, num_decode=2, disaggregation=False,
                       long_prompt_tokens=1024)
    sched.output_fraction = 1.0
    sched.decode.placed(0, 20, 23)
    sched.decode.progressed("d0", 3, 3 / 23)
    for _ in range(2):
        sched.decode.placed(1, 20, 120)
        sched.decode.progressed("d1", 60, 0.5)
    decision = sched.decide(_req(0, 7000, 16), NOW)
    assert decision.decode_replica == "d1", decision.reason
