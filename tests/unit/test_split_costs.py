"""The split path's hop and transfer as measured (runtime/scheduler/handoff.py): the model
follows what split requests took, a stalled one moves it a bounded step, requests that did
not split teach it nothing, and a slower hop than configured sends short prompts local."""

from __future__ import annotations

import pytest

from runtime.messages import PhaseTimings
from runtime.scheduler.handoff import MAX_SAMPLE_MS, WEIGHT, Handoff
from runtime.scheduler.live import LiveConfig, LiveScheduler
from runtime.scheduler.policy import PolicyConfig
from runtime.scheduler.types import Decision
from tests.unit.test_scheduler_policy import NOW, _req, _scheduler


def test_it_starts_from_the_configuration_and_follows_the_measurements() -> None:
    config = PolicyConfig(split_overhead_ms=5.0, transfer_latency_ms=0.5,
                          kv_bytes_per_token=1000, link_bytes_per_s=1e6)
    handoff = Handoff.of(config)
    assert handoff.first_ms == 5.0
    assert handoff.transfer_ms(100) == pytest.approx(0.5 + 100.0)  # 100 KB at 1 MB/s
    for _ in range(100):  # every split took 30 ms beyond its prefill, its KV 120 ms
        handoff.observe(30.0, 100, 120.0)
    assert handoff.first_ms == pytest.approx(30.0, abs=0.1)
    assert handoff.latency_ms == pytest.approx(20.0, abs=0.1)  # beyond the bytes' 100 ms
    assert handoff.transfer_ms(1000) == pytest.approx(20.0 + 1000.0, abs=0.1)
    handoff.observe(30.0, 100, 0.0)  # no transfer measured: its latency stays
    assert handoff.latency_ms == pytest.approx(20.0, abs=0.1)
    assert handoff.num_samples == 101


def test_one_stalled_request_moves_it_a_bounded_step() -> None:
    handoff = Handoff.of(PolicyConfig(split_overhead_ms=5.0))
    handoff.observe(60_000.0, 10, 0.0)  # a minute: a stalled call, not a hop
    assert handoff.first_ms == pytest.approx(5.0 + WEIGHT * (MAX_SAMPLE_MS - 5.0))
    handoff.observe(-3.0, 10, 0.0)  # clocks of two processes: never below zero
    assert handoff.first_ms > 0


def _timings(mode: str, ttft_ms: float, **kw: object) -> PhaseTimings:
    fields: dict[str, object] = dict(
        scheduler_queue_ms=2.0, prefill_queue_ms=3.0, prefill_compute_ms=40.0,
        kv_transfer_ms=25.0, kv_transfer_bytes=1000, decode_queue_ms=0.0,
        decode_compute_ms=100.0, ttft_ms=ttft_ms, tpot_ms=5.0, e2e_ms=300.0,
        num_prompt_tokens=300, num_output_tokens=20, num_loaded_tokens=300,
        num_decode_computed_prompt_tokens=0, mode=mode, kv_transfer_exposed_ms=25.0)
    fields.update(kw)
    return PhaseTimings(**fields)  # type: ignore[arg-type]


def test_only_split_requests_served_as_decided_teach_it() -> None:
    live = LiveScheduler(LiveConfig(PolicyConfig(split_overhead_ms=5.0), 0, 16, 8))
    handoff = live.policy.handoff
    live.handoff_measured(_timings("local", ttft_ms=200.0), True)
    live.handoff_measured(_timings("disaggregated", ttft_ms=200.0, num_retries=1), True)
    live.handoff_measured(_timings("disaggregated", ttft_ms=200.0, degraded=True), True)
    assert handoff.num_samples == 0 and handoff.first_ms == 5.0
    live.handoff_measured(_timings("disaggregated", ttft_ms=65.0), True)  # 20 ms beyond 45
    assert handoff.num_samples == 1
    assert handoff.first_ms == pytest.approx(5.0 + WEIGHT * (20.0 - 5.0))
    latency_ms = handoff.latency_ms
    # sent while another prompt ran there: it waited for that step before the engine's
    # queue saw it. Its transfer counts, its hop does not
    live.handoff_measured(_timings("disaggregated", ttft_ms=300.0, kv_transfer_exposed_ms=80.0),
                          False)
    assert handoff.first_ms == pytest.approx(5.0 + WEIGHT * (20.0 - 5.0))
    assert handoff.latency_ms > latency_ms and handoff.num_samples == 2
    assert "handoff" in live.snapshot()


def test_a_slow_hop_sends_short_prompts_local() -> None:
    """A 400-token prompt on a decode replica with 600 tokens of short work ahead: with the
    configured 5 ms hop the split has the KV there sooner; once the splits measured a 40 ms
    hop and a 30 ms transfer, a local prefill is sooner."""
    def mode_after(num_measured: int) -> str:
        sched = _scheduler(num_short=1, num_long=0, num_decode=1, local_max_prompt_tokens=None,
                           decode_balance=False)
        sched.decode.work.book(0, "ahead", "short", 600, NOW)
        for _ in range(num_measured):
            sched.handoff.observe(40.0, 400, 30.0 + sched.handoff.bytes_ms(400))
        decision = sched.decide(_req(0, 400), NOW)
        assert isinstance(decision, Decision)
        return decision.mode

    assert mode_after(0) == "disaggregated"
    assert mode_after(50) == "local"
