"""Latency, goodput and cost figures of a simulated run."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from runtime.cost import RequestCost
from runtime.scheduler.sim.replicas import Req
from runtime.scheduler.sim.simulator import SimRun


@dataclass(frozen=True)
class BandCost:
    """The requests whose prompts fall in one length band."""

    name: str  # e.g. "<16384" or ">=16384" prompt tokens
    num_requests: int
    num_prompt_tokens: int
    total: RequestCost

    @property
    def per_request(self) -> RequestCost:
        return _scaled(self.total, 1 / self.num_requests)

    @property
    def prefill_engine_s_per_1k_prompt_tokens(self) -> float:
        """Grows with the prompt when prefill is quadratic."""
        return 1e3 * self.total.prefill_engine_s / self.num_prompt_tokens


@dataclass(frozen=True)
class CostSummary:
    """What the finished requests cost (StepLedger shares, priced per pool), and the capacity
    nobody used: per-request costs + unattributed + idle = replicas x wall time."""

    num_requests: int
    num_output_tokens: int
    total: RequestCost  # every finished request's cost, added
    replica_s: float  # replicas x the run's wall time
    unattributed_s: float  # step time no request took part in
    idle_s: float  # no step running
    idle_dollars: float  # idle and unattributed time at each replica's price
    bands: tuple[BandCost, ...]

    @property
    def per_request(self) -> RequestCost:
        return _scaled(self.total, 1 / max(1, self.num_requests))

    @property
    def per_1k_output_tokens(self) -> RequestCost:
        return _scaled(self.total, 1e3 / max(1, self.num_output_tokens))

    @property
    def idle_fraction(self) -> float:
        """Share of the cluster's replica-seconds no request used."""
        return (self.idle_s + self.unattributed_s) / self.replica_s if self.replica_s else 0.0


@dataclass(frozen=True)
class RunSummary:
    num_requests: int
    num_failed: int
    short_ttft_p50_ms: float
    short_ttft_p99_ms: float
    long_ttft_p50_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    goodput_rps: float
    throughput_rps: float
    local_fraction: float
    cost: CostSummary


def summarize(run: SimRun, long_prompt_tokens: int, ttft_slo_ms: float,
              tpot_slo_ms: float, ideal_prefill_ms: Callable[[int], float] | None = None
              ) -> RunSummary:
    """Goodput counts requests whose TTFT is within ttft_slo_ms plus, when given, 3x their
    prompt's unloaded prefill time (a 100K-token prompt cannot have a chat TTFT), and whose
    time per output token is within tpot_slo_ms."""
    reqs = run.reqs
    done = [r for r in reqs if r.finish >= 0]
    prompt = np.array([r.prompt_len for r in done])
    ttft_target = np.full(len(done), float(ttft_slo_ms))
    if ideal_prefill_ms is not None:
        ttft_target += np.array([3 * ideal_prefill_ms(r.prompt_len) for r in done])
    ttft = np.array([(r.first_token - r.arrival) * 1e3 for r in done])
    multi = np.array([r.output_len > 1 for r in done])
    tpot = np.array([(r.finish - r.first_token) * 1e3 / max(1, r.output_len - 1)
                     for r in done])
    short = prompt < long_prompt_tokens
    span = max(r.finish for r in done) - min(r.arrival for r in reqs)
    good = (ttft <= ttft_target) & (~multi | (tpot <= tpot_slo_ms))

    def pct(values: np.ndarray, q: float) -> float:
        return float(np.percentile(values, q)) if len(values) else float("nan")

    return RunSummary(
        num_requests=len(reqs),
        num_failed=len(reqs) - len(done),
        short_ttft_p50_ms=pct(ttft[short], 50),
        short_ttft_p99_ms=pct(ttft[short], 99),
        long_ttft_p50_ms=pct(ttft[~short], 50),
        tpot_p50_ms=pct(tpot[multi], 50),
        tpot_p99_ms=pct(tpot[multi], 99),
        goodput_rps=float(good.sum()) / span,
        throughput_rps=len(done) / span,
        local_fraction=sum(r.local for r in done) / len(done),
        cost=summarize_cost(run, long_prompt_tokens),
    )


def summarize_cost(run: SimRun, long_prompt_tokens: int) -> CostSummary:
    done = [r for r in run.reqs if r.finish >= 0]
    usages = [replica.usage for replica in run.replicas]
    summary = CostSummary(
        num_requests=len(done),
        num_output_tokens=sum(r.output_len for r in done),
        total=_total(done),
        replica_s=len(usages) * run.wall_s,
        unattributed_s=sum(u.unattributed_s for u in usages),
        idle_s=sum(u.idle_s for u in usages),
        idle_dollars=sum(replica.idle_dollars for replica in run.replicas),
        bands=tuple(band for band in (
            _band(f"<{long_prompt_tokens}", [r for r in done if r.prompt_len < long_prompt_tokens]),
            _band(f">={long_prompt_tokens}",
                  [r for r in done if r.prompt_len >= long_prompt_tokens]))
            if band is not None),
    )
    accounted_s = summary.total.engine_s + summary.unattributed_s + summary.idle_s
    assert math.isclose(accounted_s, summary.replica_s, rel_tol=1e-6, abs_tol=1e-9), \
        f"costs {accounted_s} s do not add up to replicas x wall {summary.replica_s} s"
    return summary


def _band(name: str, reqs: list[Req]) -> BandCost | None:
    if not reqs:
        return None
    return BandCost(name, len(reqs), sum(r.prompt_len for r in reqs), _total(reqs))


def _total(reqs: list[Req]) -> RequestCost:
    total = RequestCost()
    for req in reqs:
        total += req.cost
    return total


def _scaled(cost: RequestCost, factor: float) -> RequestCost:
    return RequestCost(cost.prefill_engine_s * factor, cost.decode_engine_s * factor,
                       cost.prefill_kv_block_s * factor, cost.decode_kv_block_s * factor,
                       round(cost.bytes_moved * factor), cost.dollars * factor)
