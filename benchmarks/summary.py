"""Summaries of one load run: latency percentiles per request class, goodput, throughput, and
the server's own per-phase split (pure functions of the load generator's records)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from benchmarks.loadgen import RequestRecord

PHASES = ("scheduler_queue", "prefill_queue", "prefill_compute", "kv_transfer", "decode_queue",
          "decode_compute")


@dataclass(frozen=True)
class SLO:
    ttft_ms: float
    tpot_ms: float

    def met_by(self, record: RequestRecord) -> bool:
        tpot = record.tpot_ms
        return (not record.error and record.ttft_ms is not None and record.ttft_ms <= self.ttft_ms
                and (tpot is None or tpot <= self.tpot_ms))


@dataclass(frozen=True)
class ClassSummary:
    """One class of requests (short or long, or all) in one run."""

    num_requests: int
    num_errors: int
    ttft_ms: dict[str, float]  # p50, p90, p99
    tpot_ms: dict[str, float]
    e2e_ms: dict[str, float]
    mean_ttft_ms: float
    mean_e2e_ms: float
    num_slo_met: int
    phases_ms: dict[str, float]  # mean of the server's phases, where it reports them
    modes: dict[str, int]  # how the server ran them (disaggregated / local)


@dataclass(frozen=True)
class RunSummary:
    target: str
    rate_per_s: float
    duration_s: float
    goodput_per_s: float  # requests meeting both SLOs, per second of the run
    throughput_tokens_per_s: float  # output tokens per second of the run
    throughput_requests_per_s: float
    classes: dict[str, ClassSummary]  # "short", "long", "all"
    # CPU seconds the target's processes used during the run, by role (benchmarks/cpu_usage)
    cpu_s_by_role: dict[str, float] = field(default_factory=dict)
    # what the server charged the run's requests (timings.cost, runtime/cost.py) per 1,000
    # output tokens: engine-seconds by phase, KV block-seconds, dollars; empty when the
    # target reports no cost
    cost_per_1k_tokens: dict[str, float] = field(default_factory=dict)
    cost_estimated: bool = False  # the costs are estimates from token arrivals (plain vLLM)
    # median prefill engine-microseconds per prompt token, by prompt length (PROMPT_BUCKETS):
    # flat where prefill is linear, rising where attention's quadratic term shows
    prefill_us_per_token: dict[str, float] = field(default_factory=dict)
    # the engines' busy seconds over the run, as the server reports them (ours only): the
    # requests' engine-seconds should add up to it
    engine_busy_s: float | None = None

    @property
    def cost_coverage(self) -> float | None:
        """The requests' engine-seconds over the engines' busy time during the run."""
        if not self.engine_busy_s or not self.cost_per_1k_tokens:
            return None
        charged = sum(self.cost_per_1k_tokens.get(f"{phase}_engine_s", 0.0)
                      for phase in ("prefill", "decode")) * self.num_output_tokens / 1e3
        return charged / self.engine_busy_s

    @property
    def num_output_tokens(self) -> float:
        return self.throughput_tokens_per_s * self.duration_s

    @property
    def cpu_ms_per_token(self) -> float:
        """CPU milliseconds (every process of the target) per output token."""
        tokens = self.num_output_tokens
        return 1e3 * sum(self.cpu_s_by_role.values()) / tokens if tokens else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "cpu_ms_per_token": self.cpu_ms_per_token,
                "cost_coverage": self.cost_coverage}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    p50, p90, p99 = np.percentile(np.asarray(values), [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def summarize_class(records: list[RequestRecord], slo: SLO) -> ClassSummary:
    ok = [r for r in records if not r.error and r.ttft_ms is not None]
    phases: dict[str, float] = {}
    timed: list[dict[str, Any]] = [r.server_timings for r in ok if r.server_timings]
    if timed:
        phases = {p: float(np.mean([t["phases_ms"][p] for t in timed])) for p in PHASES}
    modes: dict[str, int] = {}
    for t in timed:
        modes[t["mode"]] = modes.get(t["mode"], 0) + 1
    return ClassSummary(
        num_requests=len(records),
        num_errors=sum(1 for r in records if r.error),
        ttft_ms=percentiles([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        tpot_ms=percentiles([tp for r in ok if (tp := r.tpot_ms) is not None]),
        e2e_ms=percentiles([r.e2e_ms for r in ok if r.e2e_ms is not None]),
        mean_ttft_ms=_mean([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        mean_e2e_ms=_mean([r.e2e_ms for r in ok if r.e2e_ms is not None]),
        num_slo_met=sum(1 for r in records if slo.met_by(r)),
        phases_ms=phases,
        modes=modes,
    )


def summarize(target: str, rate_per_s: float, records: list[RequestRecord], slo: SLO,
              long_prompt_tokens: int, cpu_s_by_role: dict[str, float] | None = None,
              engine_busy_s: float | None = None) -> RunSummary:
    """Short requests are those with prompts under long_prompt_tokens."""
    sent = [r for r in records if r.sent_s]
    start = min((r.sent_s for r in sent), default=0.0)
    end = max((r.sent_s + r.e2e_ms / 1e3 for r in sent if r.e2e_ms is not None), default=start)
    duration_s = max(end - start, 1e-9)
    classes = {
        "short": summarize_class([r for r in records if r.prompt_len < long_prompt_tokens], slo),
        "long": summarize_class([r for r in records if r.prompt_len >= long_prompt_tokens], slo),
        "all": summarize_class(records, slo),
    }
    num_tokens = sum(r.num_output_tokens for r in records if not r.error)
    num_ok = sum(1 for r in records if not r.error)
    return RunSummary(target, rate_per_s, duration_s, classes["all"].num_slo_met / duration_s,
                      num_tokens / duration_s, num_ok / duration_s, classes,
                      dict(cpu_s_by_role or {}), cost_per_1k_tokens(records),
                      any(r.estimated_cost is not None for r in records),
                      prefill_us_per_token(records), engine_busy_s)


COST_FIELDS = ("prefill_engine_s", "decode_engine_s", "prefill_kv_block_s", "decode_kv_block_s",
               "dollars")


def cost_per_1k_tokens(records: list[RequestRecord]) -> dict[str, float]:
    """The per-request costs (the server's, or estimated) summed over the run, per 1,000
    output tokens, for the fields every request has; empty unless every finished request
    has a cost."""
    ok = [r for r in records if not r.error]
    costs = [r.cost for r in ok]
    num_tokens = sum(r.num_output_tokens for r in ok)
    if not ok or not num_tokens or any(c is None for c in costs):
        return {}
    return {name: 1e3 * sum(float(c[name]) for c in costs if c) / num_tokens
            for name in COST_FIELDS if all(c and name in c for c in costs)}


PROMPT_BUCKETS = ((0, 1024, "<1K"), (1024, 2048, "1-2K"), (2048, 4096, "2-4K"),
                  (4096, 1 << 30, "4K+"))


def prefill_us_per_token(records: list[RequestRecord]) -> dict[str, float]:
    """Median prefill engine-us per computed prompt token, by prompt length bucket."""
    out = {}
    for low, high, label in PROMPT_BUCKETS:
        per_token = []
        for r in records:
            cost = None if r.error else r.cost
            if cost is None or not low <= r.prompt_len < high:
                continue
            cached = int((r.server_timings or {}).get("num_cached_prompt_tokens", 0))
            if r.prompt_len > cached and cost["prefill_engine_s"] > 0:
                per_token.append(1e6 * cost["prefill_engine_s"] / (r.prompt_len - cached))
        if per_token:
            out[label] = float(np.median(per_token))
    return out
