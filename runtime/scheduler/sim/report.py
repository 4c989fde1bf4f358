"""Latency and goodput figures of a simulated run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from runtime.scheduler.sim.simulator import Req


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


def summarize(reqs: list[Req], long_prompt_tokens: int, ttft_slo_ms: float,
              tpot_slo_ms: float, ideal_prefill_ms: Callable[[int], float] | None = None
              ) -> RunSummary:
    """Goodput counts requests whose TTFT is within ttft_slo_ms plus, when given, 3x their
    prompt's unloaded prefill time (a 100K-token prompt cannot have a chat TTFT), and whose
    time per output token is within tpot_slo_ms."""
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
    )
