"""The pools' autoscaling policy on synthetic signal traces (no Ray: the policy is the plain
callable Serve's controller calls)."""

from __future__ import annotations

import random

import pytest

from runtime.app_config import PoolConfig
from runtime.autoscaling import PoolAutoscaler, decode_demand, prefill_demand


def _run(policy: PoolAutoscaler, demands: list[float], start: int = 1,
         period_s: float = 1.0) -> list[int]:
    current, state, out = start, {}, []
    for i, demand in enumerate(demands):
        current, state = policy.decide(current, demand, i * period_s, state)
        out.append(current)
    return out


def test_scales_up_only_on_sustained_demand_and_down_one_at_a_time():
    policy = PoolAutoscaler(upscale_delay_s=3, downscale_delay_s=5, min_replicas=1,
                            max_replicas=3)
    # a 2 s spike: no change; then 6 s of demand for 3 replicas; then it goes away
    trace = [0.5] * 3 + [2.5] * 2 + [0.5] * 3 + [2.6] * 6 + [0.2] * 14
    replicas = _run(policy, trace)
    assert replicas[:8] == [1] * 8  # the spike was shorter than the delay
    assert max(replicas) == 3 and replicas.index(3) == 8 + 3  # after 3 s of sustained demand
    downs = [b for a, b in zip(replicas, replicas[1:], strict=False) if b < a]
    assert downs == [2, 1]  # one replica at a time
    assert replicas[-1] == 1


def test_noise_around_a_boundary_never_flaps():
    policy = PoolAutoscaler(upscale_delay_s=5, downscale_delay_s=10, min_replicas=1,
                            max_replicas=4)
    rng = random.Random(0)
    trace = [2.0 + rng.uniform(-0.6, 0.6) for _ in range(200)]  # hovers around 2 replicas
    replicas = _run(policy, trace, start=2)
    changes = sum(1 for a, b in zip(replicas, replicas[1:], strict=False) if a != b)
    assert changes <= 2, replicas


def test_never_below_min_or_above_max():
    policy = PoolAutoscaler(upscale_delay_s=0, downscale_delay_s=0, min_replicas=2,
                            max_replicas=3)
    replicas = _run(policy, [0.0] * 5 + [50.0] * 5 + [0.0] * 5, start=2)
    assert min(replicas) == 2 and max(replicas) == 3


def test_no_report_keeps_the_current_count():
    policy = PoolAutoscaler(0, 0, 1, 4)
    assert policy.decide(3, None, 0.0, {})[0] == 3


def test_demand_counts_quadratic_prefill_work_and_the_tightest_decode_resource():
    # 3.2 s of predicted prefill work with a 1 s TTFT budget at 80%: four replicas
    assert prefill_demand(3200, 2, 1000, 0.8).replicas == pytest.approx(4.0)
    # decode: KV 90% full on one of two replicas -> (0.45 avg) / 0.8; TPOT 120 ms of a 100
    # ms budget at 80% is the tightest
    demand = decode_demand([0.9, 0.0], [4, 2], 32, [120.0, 40.0], 100.0, 0.8)
    assert "TPOT" in demand.reason and demand.replicas == pytest.approx(2 * 120 / 80)


def test_autoscaling_config_is_validated():
    with pytest.raises(ValueError, match="min_replicas"):
        PoolConfig.model_validate({"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    pool = PoolConfig.model_validate({"autoscaling": {"max_replicas": 4}})
    assert pool.autoscaling is not None and pool.autoscaling.min_replicas == 1


def test_serve_takes_the_policys_count_at_once_and_gets_the_demand():
    """Two Ray Serve 2.60 behaviours the slow autoscaling test caught: Serve applies its own
    up/downscale delays (30 s / 600 s by default) again to a custom policy's answer, so the
    pool's config sets them to 0 (the policy holds the pool's delays); and replicas push their
    custom metrics (the demand) only when they collect running requests themselves."""
    from runtime.app import _scaling
    from runtime.app_config import AppConfig
    from runtime.serve_cli import serve_env

    spec = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 2.0}
    scaling = _scaling(PoolConfig.model_validate({"autoscaling": spec}), 5.0)
    serve_config = scaling["autoscaling_config"]
    assert serve_config["upscale_delay_s"] == 0 and serve_config["downscale_delay_s"] == 0
    assert serve_config["policy"]["policy_kwargs"]["upscale_delay_s"] == 2.0
    fixed = AppConfig.model_validate({"engine": {"model": "m"}})
    scaled = AppConfig.model_validate({"engine": {"model": "m"}, "prefill": {"autoscaling": spec}})
    key = "RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE"
    assert key not in serve_env(fixed) and serve_env(scaled)[key] == "0"


def test_a_replica_reports_over_serve_only_while_the_ingress_does_not_read_its_load():
    """The ingress reads each replica's load over its direct connection every period; the
    replica's own Serve calls pause while those reads come, and resume after a few missed
    periods. Every USAGE_EVERY reads carry the engine's time too."""
    import asyncio

    from runtime.messages import USAGE_EVERY
    from runtime.replica_common import Reporter

    async def run() -> None:
        reporter = Reporter("app", lambda: "report", lambda: "usage", start=False)
        assert not reporter.pulled_recently and reporter.autoscaling_stats() == {}
        reads = [reporter.pulled(2.0) for _ in range(USAGE_EVERY)]
        assert reads[0] == ("report", None) and reads[-1] == ("report", "usage")
        assert reporter.pulled_recently and reporter.autoscaling_stats() != {}
        assert reporter.pulled(None)[0] == "report" and reporter.demand == 2.0
        reporter._pulled_at -= 10.0  # no read for 10 s: it reports over Serve again
        assert not reporter.pulled_recently

    asyncio.run(run())
