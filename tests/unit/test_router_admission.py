"""The ingress's request path without Ray: admission control answers 429 with Retry-After."""

from __future__ import annotations

import time

import pytest

from runtime.app_config import AppConfig
from runtime.metrics import Metrics
from runtime.openai_api import APIError
from runtime.requests import SamplingSpec
from runtime.router import Router, live_config
from runtime.scheduler.live import LiveScheduler
from runtime.scheduler.types import ReplicaReport


def _router(admission: bool) -> tuple[Router, LiveScheduler]:
    config = AppConfig.model_validate({
        "engine": {"model": "no-such-model", "max_model_len": 16384},
        "scheduler": {"admission": admission, "local_max_prompt_tokens": 0},
        "slo": {"ttft_ms": 200.0},
    })
    live = LiveScheduler(live_config(config))
    router = Router(config, tokenizer=None, prefill=None, decode=None,  # type: ignore[arg-type]
                    metrics=Metrics(), live=live)
    return router, live


CALIBRATION = ((64, 5.0), (1024, 60.0), (4096, 400.0), (8192, 1400.0))  # ms, quadratic


def _report(live: LiveScheduler) -> None:
    import time

    live.report(ReplicaReport("prefill", "p0", 0, 0, 0, 0, 0, 0, time.time(), CALIBRATION))
    live.report(ReplicaReport("decode", "d0", 0, 1000, 1000, 128, 0, 64, time.time(),
                              CALIBRATION))


def test_the_calibration_seeds_each_replicas_prefill_model():
    _, live = _router(admission=False)
    _report(live)
    for n, ms in CALIBRATION:
        assert live.prefill.work.model(0).predict_ms(n) == pytest.approx(ms, rel=0.15)
        assert live.decode.work.model(0).predict_ms(n) == pytest.approx(ms, rel=0.15)


def test_admission_rejects_with_retry_after_when_the_ttft_would_miss_the_slo():
    router, live = _router(admission=True)
    _report(live)
    live.prefill.work.book(0, "earlier", "short", 8192, time.monotonic())  # 1.4 s of work
    with pytest.raises(APIError) as err:
        router.prepare(list(range(500)), SamplingSpec(max_tokens=8), "cmpl")
    assert err.value.status == 429 and err.value.retry_after_s is not None
    assert err.value.retry_after_s > 1
    live.prefill.work.finished("earlier")
    prepared = router.prepare(list(range(500)), SamplingSpec(max_tokens=8), "cmpl")
    assert prepared.decision is not None and prepared.decision.mode == "disaggregated"
    assert prepared.request.priority == 0  # the short lane's priority on the engines


def test_without_admission_the_request_is_placed_anyway():
    router, live = _router(admission=False)
    _report(live)
    live.prefill.work.book(0, "earlier", "short", 8192, time.monotonic())
    prepared = router.prepare(list(range(5000)), SamplingSpec(max_tokens=8), "cmpl")
    assert prepared.decision is not None and prepared.decision.prefill_replica == "p0"
    assert prepared.decision.lane == "long" and prepared.request.priority == 1


def test_admission_needs_an_slo():
    with pytest.raises(ValueError, match="slo.ttft_ms"):
        AppConfig.model_validate({"engine": {"model": "m"}, "scheduler": {"admission": True}})


def test_the_request_lane_is_the_policys_with_a_prefill_time_budget():
    config = AppConfig.model_validate({
        "engine": {"model": "no-such-model", "max_model_len": 16384},
        "scheduler": {"long_prompt_tokens": 8000, "long_prefill_ms": 100.0},
    })
    live = LiveScheduler(live_config(config))
    router = Router(config, tokenizer=None, prefill=None, decode=None,  # type: ignore[arg-type]
                    metrics=Metrics(), live=live)
    _report(live)  # 1,024 tokens: 60 ms predicted; 4,096 tokens: 400 ms
    short = router.prepare(list(range(1024)), SamplingSpec(max_tokens=8), "cmpl")
    long_ = router.prepare(list(range(4096)), SamplingSpec(max_tokens=8), "cmpl")
    assert short.lane == "short" and long_.lane == "long"  # under long_prompt_tokens: by time
    assert long_.decision is not None and long_.decision.lane == long_.lane


def test_the_slos_price_a_tpot_ms_in_first_token_ms():
    """The policy weighs a TPOT ms against a first-token ms as the SLOs do: TTFT SLO over
    TPOT SLO (the defaults, 1,000 and 100 ms, without them)."""
    def price(slo: dict[str, float]) -> float:
        config = AppConfig.model_validate({"engine": {"model": "no-such-model"}, "slo": slo})
        return live_config(config).policy.tpot_price

    assert price({"ttft_ms": 2000.0, "tpot_ms": 50.0}) == pytest.approx(40.0)
    assert price({"ttft_ms": 300.0}) == pytest.approx(3.0)
    assert price({}) == pytest.approx(10.0)
