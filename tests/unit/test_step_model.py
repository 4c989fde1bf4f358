"""The decode step model (runtime/scheduler/step_model.py): the replica's fit of its engine's
step time by batch size, and the colocated placement that uses it."""

from __future__ import annotations

import random
import time

import pytest

from runtime.cost_tracker import CostTracker, StepCounts
from runtime.scheduler.decode_cost import decode_cost_ms
from runtime.scheduler.live import LiveConfig, LiveScheduler
from runtime.scheduler.policy import PolicyConfig
from runtime.scheduler.prefill_model import PrefillModel
from runtime.scheduler.step_model import DecodeStepFit, DecodeStepModel
from runtime.scheduler.types import Decision, ReplicaReport, RequestInfo
from tests.unit.test_scheduler_policy import NOW, _scheduler


def _cost(sched, request: RequestInfo):
    """What the policy adds to a request's first token on each decode replica."""
    return decode_cost_ms(sched.decode, request.prompt_len, request.max_tokens,
                          sched.output_fraction, sched.config.tpot_price, NOW)


def _fitted(steps: list[tuple[int, float]]) -> DecodeStepModel | None:
    fit = DecodeStepFit()
    for batch, ms in steps:
        fit.add(batch, ms)
    return fit.model


def test_fit_recovers_the_fixed_and_per_sequence_cost_through_noise():
    rng = random.Random(0)
    steps = [(b, (4.0 + 0.7 * b) * rng.uniform(0.9, 1.1))
             for b in (rng.randint(1, 16) for _ in range(400))]
    model = _fitted(steps)
    assert model is not None
    assert model.s0_ms == pytest.approx(4.0, rel=0.2)
    assert model.s1_ms == pytest.approx(0.7, rel=0.1)
    assert model.step_ms(10) == pytest.approx(11.0, rel=0.05)


def test_no_model_from_a_few_steps_and_bad_samples_are_ignored():
    assert _fitted([(b, 5.0) for b in (1, 3)] * 5) is None
    assert _fitted([(0, 5.0), (3, float("nan")), (1, -1.0)] * 20) is None


def test_steady_batches_move_the_level_not_the_per_sequence_cost():
    # one batch size: s0 and s1 cannot be told apart, and no model is given
    assert _fitted([(4, 8.0)] * 50) is None
    fit = DecodeStepFit()
    for batch in list(range(1, 9)) * 20:
        fit.add(batch, 2.0 + 1.0 * batch)
    for _ in range(3000):  # a long stretch at 4 sequences, the core now shared
        fit.add(4, 10.0)
    model = fit.model
    assert model is not None
    # the slope was last told while the shift began (it reads part of it as per-sequence
    # cost) and is kept since; the level follows the core's new speed
    assert 0.5 < model.s1_ms <= 1.0
    assert model.step_ms(4) == pytest.approx(10.0, rel=0.01)


def test_noise_over_few_sequences_does_not_move_the_per_sequence_cost():
    rng = random.Random(1)
    fit = DecodeStepFit()
    for batch in (1, 4, 8):  # calibration
        for _ in range(32):
            fit.add(batch, 3.0 + 0.5 * batch)
    for _ in range(2000):  # one to three sequences on a shared core: +-50% per step
        batch = rng.randint(1, 3)
        fit.add(batch, (3.0 + 0.5 * batch) * rng.uniform(0.5, 1.5))
    model = fit.model
    assert model is not None and model.s1_ms == pytest.approx(0.5, rel=0.2)
    assert model.step_ms(2) == pytest.approx(4.0, rel=0.1)


def test_no_negative_coefficient():
    flat = _fitted([(b, 10.0 - 0.1 * b) for b in range(1, 9)] * 10)  # noise: slower small
    assert flat is not None and flat.s1_ms == 0.0 and flat.s0_ms > 0
    steep = _fitted([(b, 2.0 * b - 3.0) for b in range(2, 9)] * 10)  # below zero at b = 1
    assert steep is not None and steep.s0_ms == 0.0 and steep.s1_ms > 0


def test_fit_follows_an_engine_that_slows_down():
    steps = [(b, 2.0 + 0.5 * b) for b in range(1, 9)] * 100
    steps += [(b, 2.0 + 1.5 * b) for b in range(1, 9)] * 150  # another engine shares its core
    model = _fitted(steps)
    assert model is not None and model.s1_ms == pytest.approx(1.5, rel=0.05)


def test_cost_tracker_fits_the_period_of_decode_only_steps():
    """A step's time is the interval since the step before (model, scheduling, output
    processing); prefill steps and the gap after the engine went idle are left out."""
    clock = [0.0]
    tracker = CostTracker(block_size=16, clock=lambda: clock[0])

    def step(period_ms: float, prefill_tokens: int, batch: int) -> None:
        clock[0] += period_ms / 1e3
        # the model's own part of the step is a fraction of it: not what is fitted
        tracker.on_step(StepCounts(period_ms / 3e3, int(prefill_tokens > 0), prefill_tokens,
                                   batch))

    for n in range(40):
        tracker.begin(f"r{n}", 100)
        step(500.0, 2000, 3)  # a prefill step: not a decode step
        for batch in (1, 2, 4, 8):
            step(3.0 + 1.0 * batch, 0, batch)
        tracker.end(f"r{n}")
        clock[0] += 0.3  # idle: the next request's first decode step is not 300 ms
    model = tracker.decode_steps.model
    assert model is not None
    assert model.s0_ms == pytest.approx(3.0, rel=0.01)
    assert model.s1_ms == pytest.approx(1.0, rel=0.01)


def _book(sched, n: int, replica: int, max_tokens: int = 200) -> None:
    """A request decoding on decode replica `replica`, its prompt done, halfway through."""
    sched.decode.placed(replica, 20, max_tokens)
    sched.decode.progressed(f"d{replica}", max_tokens // 2, 0.5)
    sched.decode.work.book(replica, f"b{n}", "short", 100, NOW)
    sched.decode.work.finished(f"b{n}", NOW)


def test_colocated_spreads_decodes_over_the_engines():
    sched = _scheduler(num_short=0, num_long=0, num_decode=2, disaggregation=False)
    for n in range(6):
        _book(sched, n, 0)
    # d0 decodes six sequences; a new request there would be slower per token and slow them
    decision = sched.decide(RequestInfo("r", 100, 200, NOW), NOW)
    assert isinstance(decision, Decision) and decision.decode_replica == "d1"
    assert "6" not in decision.reason.split("sequences")[0].split("predicted,")[1]


def test_colocated_still_avoids_a_long_prefill_in_progress():
    sched = _scheduler(num_short=0, num_long=0, num_decode=2, disaggregation=False)
    for n in range(2):
        _book(sched, n, 0)
    long_prompt = sched.decide(RequestInfo("long", 8000, 16, NOW), NOW)
    assert long_prompt.decode_replica == "d1"  # the emptier engine, 1.1 s of prefill
    # a short request goes to the busier one: its first token would wait for the long
    # prefill's chunks on d1, more than two sequences cost it on d0
    short = sched.decide(RequestInfo("short", 100, 16, NOW), NOW)
    assert short.decode_replica == "d0"


def test_reported_step_model_steers_requests_off_the_slower_engine():
    sched = _scheduler(num_short=0, num_long=0, num_decode=2, disaggregation=False)
    sched.decode.report_decode_step(0, (2.0, 5.0))  # d0 shares its core: 5 ms per sequence
    sched.decode.report_decode_step(1, (2.0, 1.0))
    for n in range(2):
        _book(sched, n, 1)
    # two sequences on d1 at 1 ms each still cost less than an empty d0 at 5 ms
    decision = sched.decide(RequestInfo("r", 100, 200, NOW), NOW)
    assert decision.decode_replica == "d1"
    s0, s1 = sched.decode.decode_step()
    assert list(s1) == [5.0, 1.0]
    sched.decode.report_decode_step(0, ())  # a replica with no fit yet keeps the last one
    assert list(sched.decode.decode_step()[1]) == [5.0, 1.0]


def test_a_replica_not_fitted_yet_is_priced_like_the_fitted_ones():
    sched = _scheduler(num_short=0, num_long=0, num_decode=3, disaggregation=False)
    sched.decode.report_decode_step(0, (2.0, 1.0))
    sched.decode.report_decode_step(1, (4.0, 3.0))
    s0, s1 = sched.decode.decode_step()
    assert list(s0) == [2.0, 4.0, 3.0] and list(s1) == [1.0, 3.0, 2.0]


def test_until_a_replica_reports_its_step_the_prefill_model_stands_in():
    sched = _scheduler(num_short=0, num_long=0, num_decode=2, disaggregation=False)
    s0, s1 = sched.decode.decode_step()
    assert list(s0) == [sched.decode.work.a[0]] * 2 and list(s1) == [sched.decode.work.b[0]] * 2


def test_expected_output_follows_what_requests_used():
    """Requests that stop far before max_tokens teach the expected output, and a request
    expected to decode fewer steps slows the prefills an engine runs meanwhile for fewer
    steps (its own TPOT is the same either way)."""
    sched = _scheduler(num_short=0, num_long=0, num_decode=2, disaggregation=False)
    work = sched.decode.work
    work.recent_ms[0], work.recent_at[0] = 2000.0, NOW  # d0 prefilled lately; d1 did not
    assert float(work.utilization(NOW)[0]) > 0 == float(work.utilization(NOW)[1])
    request = RequestInfo("r", 100, 1000, NOW)
    before = _cost(sched, request)
    for _ in range(200):
        sched.output_seen(10, 1000)  # requests stop far before max_tokens
    assert sched.output_fraction == pytest.approx(0.01, abs=0.001)
    after = _cost(sched, request)
    assert after[0] < before[0] and after[1] == pytest.approx(before[1])


def test_the_ingress_takes_each_replicas_reported_step_and_shows_it():
    live = LiveScheduler(LiveConfig(PolicyConfig(disaggregation=False), 0, 16, 8))
    now = time.time()
    live.report(ReplicaReport("decode", "d0", 0, 1000, 1000, 16, 0, 8, now,
                              decode_step_ms=(4.0, 0.75)))
    live.report(ReplicaReport("decode", "d1", 0, 1000, 1000, 16, 0, 8, now))  # not fitted
    steps = {d["replica"]: d["decode_step"] for d in live.snapshot()["decode"]}
    assert steps["d0"] == {"s0_ms": 4.0, "s1_ms_per_seq": 0.75, "fitted": True}
    assert steps["d1"]["fitted"] is False
    # finished requests teach the expected output: short ones, less decode cost per request
    decision = live.decide("r", 100, 1000)
    assert isinstance(decision, Decision)
    live.request_done(decision, "r", 100, 1000, tpot_ms=5.0, num_output_tokens=100)
    assert live.policy.output_fraction < 0.5


def test_decoding_beside_a_long_prefill_costs_its_chunks():
    """Every decode step an engine shares with a long prefill carries one chunk of it: a
    request decoding there has a chunk on each of its tokens while the prefill lasts, at
    most all of it spread over its tokens; its TPOT is priced in first-token ms."""
    sched = _scheduler(num_short=0, num_long=0, num_decode=2, disaggregation=False)
    sched.decide(RequestInfo("long", 8000, 16, NOW), NOW)  # on d0: 1.1 s of prefill
    chunk_ms = float(sched.decode.work.long_chunk_ms()[0])
    long_left = float(sched.decode.work.remaining_ms(NOW)[1][0])
    assert chunk_ms > 0 and long_left > 0
    few = _cost(sched, RequestInfo("few", 100, 8, NOW))
    many = _cost(sched, RequestInfo("many", 100, 4000, NOW))
    of, price = sched.output_fraction, sched.config.tpot_price
    n_few, n_long = of * 8, of * 16
    # the long prompt's own sequence on d0 makes each step there s1 dearer (the new one's
    # TPOT) and is slowed s1 for each of its own 8 expected tokens (all of 16 max_tokens x
    # 0.5: it still prefills) that the new request decodes beside, over those 8; the
    # prefills d0 runs at its recent utilization are slowed s1 a step (first-token ms); the
    # chunks are the rest of the difference, with the new prompt's own prefill, which the
    # long prompt's sequence waits for in the step they share (over its 8 tokens)
    s1 = float(sched.decode.decode_step()[1][0])
    prefill_ms = float(sched.decode.work.expected_ms(100)[0])
    u = float(sched.decode.work.utilization(NOW)[0])
    assert 0 < u < 1
    assert few[0] - few[1] == pytest.approx(
        price * (s1 + chunk_ms + s1 * min(n_few, n_long) / n_long + prefill_ms / n_long)
        + n_few * u * s1, rel=1e-6)
    assert many[0] - many[1] == pytest.approx(
        price * (s1 + long_left / 2000 + s1 + prefill_ms / n_long) + 2000 * u * s1, rel=1e-6)


def test_a_long_prompt_goes_where_its_prefill_slows_no_decodes():
    """Each step of a long prefill carries a chunk that every sequence decoding there waits
    for: a long prompt goes to the engine with nothing decoding, though the busier one would
    give it its first token a little sooner."""
    sched = _scheduler(num_short=0, num_long=0, num_decode=2, disaggregation=False,
                       model=PrefillModel(1.0, 0.05, 1e-5))
    sched.decode.work.slowdown[1] = 1.1  # d1 prefills 10% slower
    for n in range(3):
        _book(sched, n, 0, max_tokens=400)  # three sequences decoding on d0
    long_prompt = sched.decide(RequestInfo("long", 6000, 32, NOW), NOW)
    assert long_prompt.decode_replica == "d1", long_prompt.reason


def test_prefills_measured_on_the_request_path_are_fitted_at_the_next_report():
    """A prefill that ran alone is a sample for its engine's model; the least-squares refit
    waits for the replica's next load report, so no request waits for it."""
    live = LiveScheduler(LiveConfig(PolicyConfig(disaggregation=False), 0, 16, 8))
    now = time.time()
    calibration = ((64, 10.0), (512, 40.0), (2048, 200.0))
    live.report(ReplicaReport("decode", "d0", 0, 1000, 1000, 16, 0, 8, now, calibration))
    work = live.decode.work
    before = work.model(0)
    decision = Decision("short", "local", None, "d0", 0.0, "")
    for n in (64, 512, 2048) * 12:  # the engine is now 3x slower than calibrated
        live.prefill_measured(decision, n, 3 * dict(calibration)[n], clean=True)
    assert work.model(0) == before  # sampled, not refitted yet
    live.report(ReplicaReport("decode", "d0", 0, 1000, 1000, 16, 0, 8, now + 0.4))
    after = work.model(0)
    assert after.predict_ms(2048) == pytest.approx(3 * before.predict_ms(2048), rel=0.1)
