"""Prometheus metrics of the ingress: each phase's latency by lane and mode, and counters;
what requests cost by phase, lane and mode, and each engine's busy time apart from it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from runtime.cost import EngineUsage
from runtime.pipeline import PhaseTimings

_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """One registry per ingress replica (no module globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.phase_seconds = Histogram(
            "disagg_phase_seconds", "Latency of each request phase.", ["phase", "lane", "mode"],
            buckets=_BUCKETS_S, registry=self.registry,
        )
        self.requests = Counter(
            "disagg_requests", "Requests finished, by outcome.", ["lane", "mode", "outcome"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "disagg_tokens", "Tokens processed.", ["kind"], registry=self.registry
        )
        self.kv_bytes = Counter(
            "disagg_kv_transfer_bytes", "KV cache bytes moved from prefill to decode.",
            registry=self.registry,
        )
        self.transfer_failures = Counter(
            "disagg_kv_transfer_failures", "KV transfers that failed.", registry=self.registry
        )
        self.decisions = Counter(
            "disagg_scheduler_decisions", "Scheduler decisions.", ["lane", "mode"],
            registry=self.registry,
        )
        self.moved = Counter(
            "disagg_scheduler_moved", "Long prompts moved to another engine while they waited "
            "for their turn (the engine's long prefill ahead was late, or another was clearly "
            "earlier).", registry=self.registry,
        )
        self.rejections = Counter(
            "disagg_admission_rejections", "Requests rejected by admission control.",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "disagg_lane_in_flight", "Requests in flight per lane.", ["lane"],
            registry=self.registry,
        )
        self.prediction_ratio = Histogram(
            "disagg_prefill_prediction_ratio", "Measured / predicted prefill time of each "
            "request (1 is a perfect prediction).", ["lane", "mode"],
            buckets=(0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4, 10),
            registry=self.registry,
        )
        self.retries = Counter(
            "disagg_retries", "Requests retried on another replica after one failed before "
            "their first token.", registry=self.registry,
        )
        self.replica_failures = Counter(
            "disagg_replica_failures", "Calls that failed because their replica did.",
            ["role"], registry=self.registry,
        )
        self.timeouts = Counter(
            "disagg_request_timeouts", "Requests ended at server.request_timeout_s.",
            registry=self.registry,
        )
        self.degraded = Counter(
            "disagg_degraded_requests", "Requests served by the other pool because one pool "
            "had no live replica.", ["mode"], registry=self.registry,
        )
        self.demand = Gauge(
            "disagg_pool_demand_replicas", "Replicas each pool needs now, by the scheduler's "
            "signals (what the pool's autoscaler scales to).", ["pool"], registry=self.registry,
        )
        self.live_replicas = Gauge(
            "disagg_pool_live_replicas", "Replicas of each pool the scheduler can choose.",
            ["pool"], registry=self.registry,
        )
        self.pending_tokens = Gauge(
            "disagg_prefill_pending_tokens", "Prompt tokens in flight per prefill replica.",
            ["replica"], registry=self.registry,
        )

        self.cost_engine_seconds = Counter(
            "disagg_cost_engine_seconds", "Engine-seconds requests took, by phase (each "
            "engine step divided among its requests).", ["phase", "lane", "mode"],
            registry=self.registry,
        )
        self.cost_kv_block_seconds = Counter(
            "disagg_cost_kv_block_seconds", "KV blocks held x seconds by requests, by phase "
            "(prefill: while computed and under the lease).", ["phase", "lane", "mode"],
            registry=self.registry,
        )
        self.cost_dollars = Counter(
            "disagg_cost_dollars", "What requests cost at the pools' cost_per_replica_hour.",
            ["lane", "mode"], registry=self.registry,
        )
        self.engine_busy = Gauge(
            "disagg_engine_busy_seconds", "Seconds each engine spent in steps since it started.",
            ["pool", "replica"], registry=self.registry,
        )
        self.engine_wall = Gauge(
            "disagg_engine_wall_seconds", "Seconds since each engine started (busy + idle).",
            ["pool", "replica"], registry=self.registry,
        )
        self.engine_unattributed = Gauge(
            "disagg_engine_unattributed_seconds", "Busy seconds of each engine no request was "
            "charged for (warm-up, calibration).", ["pool", "replica"], registry=self.registry,
        )
        self.engine_busy_fraction = Gauge(
            "disagg_engine_busy_fraction", "Busy / wall time of each engine (1 - idle capacity).",
            ["pool", "replica"], registry=self.registry,
        )

    def record_usage(self, pool: str, replica: str, usage: EngineUsage) -> None:
        labels = {"pool": pool, "replica": replica}
        self.engine_busy.labels(**labels).set(usage.busy_s)
        self.engine_wall.labels(**labels).set(usage.wall_s)
        self.engine_unattributed.labels(**labels).set(usage.unattributed_s)
        self.engine_busy_fraction.labels(**labels).set(usage.busy_fraction)

    def record(self, timings: PhaseTimings) -> None:
        labels = {"lane": timings.lane, "mode": timings.mode}
        for phase, value_ms in timings.phases_ms.items():
            self.phase_seconds.labels(phase=phase, **labels).observe(value_ms / 1e3)
        for phase, value_ms in (("ttft", timings.ttft_ms), ("tpot", timings.tpot_ms),
                                ("e2e", timings.e2e_ms)):
            self.phase_seconds.labels(phase=phase, **labels).observe(value_ms / 1e3)
        self.requests.labels(outcome="ok", **labels).inc()
        if timings.degraded:
            self.degraded.labels(mode=timings.mode).inc()
        self.tokens.labels(kind="prompt").inc(timings.num_prompt_tokens)
        self.tokens.labels(kind="completion").inc(timings.num_output_tokens)
        self.kv_bytes.inc(timings.kv_transfer_bytes)
        if timings.predicted_prefill_ms > 0 and timings.prefill_compute_ms > 0:
            self.prediction_ratio.labels(**labels).observe(
                timings.prefill_compute_ms / timings.predicted_prefill_ms)
        if timings.transfer_error:
            self.transfer_failures.inc()
        self._record_cost(timings)

    def _record_cost(self, timings: PhaseTimings) -> None:
        labels = {"lane": timings.lane, "mode": timings.mode}
        cost = timings.cost
        for phase, engine_s, block_s in (
                ("prefill", cost.prefill_engine_s, cost.prefill_kv_block_s),
                ("decode", cost.decode_engine_s, cost.decode_kv_block_s)):
            self.cost_engine_seconds.labels(phase=phase, **labels).inc(engine_s)
            self.cost_kv_block_seconds.labels(phase=phase, **labels).inc(block_s)
        self.cost_dollars.labels(**labels).inc(cost.dollars)

    def record_failure(self, lane: str, mode: str, outcome: str) -> None:
        self.requests.labels(lane=lane, mode=mode, outcome=outcome).inc()
        if outcome == "transfer_failed":
            self.transfer_failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
