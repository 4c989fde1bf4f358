"""The ingress's request path without Ray: admission control answers 429 with Retry-After."""

from __future__ import annotations

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


def _report(live: LiveScheduler, pending_tokens: int) -> None:
    import time

    live.report(ReplicaReport("prefill", "p0", pending_tokens, 0, 0, 0, 0, 0, time.time()))
    live.report(ReplicaReport("decode", "d0", 0, 1000, 1000, 128, 0, 64, time.time()))


def test_admission_rejects_with_retry_after_when_the_ttft_would_miss_the_slo():
    router, live = _router(admission=True)
    _report(live, pending_tokens=50_000)  # 10 s of queued prefill at the default 5K tokens/s
    with pytest.raises(APIError) as err:
        router.prepare(list(range(500)), SamplingSpec(max_tokens=8), "cmpl")
    assert err.value.status == 429 and err.value.retry_after_s is not None
    assert err.value.retry_after_s > 5
    _report(live, pending_tokens=0)
    prepared = router.prepare(list(range(500)), SamplingSpec(max_tokens=8), "cmpl")
    assert prepared.decision is not None and prepared.decision.mode == "disaggregated"


def test_without_admission_the_request_is_placed_anyway():
    router, live = _router(admission=False)
    _report(live, pending_tokens=50_000)
    prepared = router.prepare(list(range(500)), SamplingSpec(max_tokens=8), "cmpl")
    assert prepared.decision is not None and prepared.decision.prefill_replica == "p0"


def test_admission_needs_an_slo():
    with pytest.raises(ValueError, match="slo.ttft_ms"):
        AppConfig.model_validate({"engine": {"model": "m"}, "scheduler": {"admission": True}})
