"""The cost estimate for servers that report none (benchmarks/timeline_cost.py), against a
synthetic FCFS chunked-prefill engine whose true per-request costs are known."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest

from benchmarks.loadgen import RequestRecord
from benchmarks.timeline_cost import estimate_costs
from runtime.cost import StepLedger

BUDGET = 2048


def _served(arrivals: list[tuple[float, int, int]], seed: int, jitter_s: float = 0.001,
            latency_s: float = 0.004) -> tuple[list[RequestRecord], dict[int, tuple[float, float]]]:
    """Run (arrival s, prompt tokens, output tokens) requests through a vLLM-like engine:
    each step decodes every running sequence, then fills the token budget with waiting
    prompts first come first served (chunked); a step takes 4 ms + 0.1 ms per token + an
    attention term. Clients see each output after latency_s + up to jitter_s. Returns the
    records and each request's true (prefill, decode) engine-seconds."""
    rng = random.Random(seed)
    arrivals = [(100.0 + a, n, m) for a, n, m in arrivals]  # a sent_s of 0 means never sent
    records = [RequestRecord(i, n, m, a, sent_s=a) for i, (a, n, m) in enumerate(arrivals)]
    left = {i: n for i, (_, n, _) in enumerate(arrivals)}
    to_decode = {i: m for i, (_, _, m) in enumerate(arrivals)}
    arrived_at = {i: a + latency_s for i, (a, _, _) in enumerate(arrivals)}
    seen: dict[int, list[float]] = {i: [] for i in left}
    ledger, now, decoding = StepLedger(), 0.0, set()
    while any(to_decode.values()):
        waiting = [i for i in sorted(left, key=arrived_at.get)
                   if left[i] > 0 and arrived_at[i] <= now]
        if not waiting and not decoding:
            now = min(arrived_at[i] for i in left if left[i] > 0)
            continue
        budget, chunks = BUDGET - len(decoding), {}
        for i in waiting:
            if budget <= 0:
                break
            chunks[i] = min(budget, left[i])
            budget -= chunks[i]
        done_so_far = {i: arrivals[i][1] - left[i] for i in chunks}
        duration = 0.004 + 1e-4 * (sum(chunks.values()) + len(decoding)) + 2e-8 * sum(
            n * (done_so_far[i] + n / 2) for i, n in chunks.items())
        ledger.record_step(duration, chunks, set(decoding))
        now += duration
        for i in list(decoding):
            seen[i].append(now + latency_s + rng.uniform(0, jitter_s))
            to_decode[i] -= 1
            if to_decode[i] == 0:
                decoding.discard(i)
        for i, n in chunks.items():
            left[i] -= n
            if left[i] == 0:
                seen[i].append(now + latency_s + rng.uniform(0, jitter_s))
                to_decode[i] -= 1
                if to_decode[i] > 0:
                    decoding.add(i)
    truth = {}
    for record in records:
        times = seen[record.index]
        record.ttft_ms = 1e3 * (times[0] - record.sent_s)
        record.itl_ms = [1e3 * (b - a) for a, b in pairwise(times)]
        record.e2e_ms = 1e3 * (times[-1] - record.sent_s)
        record.num_output_tokens = len(times)
        cost = ledger.close(record.index)
        truth[record.index] = (cost.prefill_engine_s, cost.decode_engine_s)
    return records, truth


def _mixed_arrivals(seed: int, n: int = 60) -> list[tuple[float, int, int]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(4.0)
        long = rng.random() < 0.15
        out.append((t, rng.randint(2500, 6000) if long else rng.randint(20, 900),
                    rng.randint(2, 120)))
    return out


@pytest.mark.parametrize("jitter_s", [0.001, 0.003])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_estimate_recovers_what_each_request_cost(seed, jitter_s):
    """Outputs of one step reach the clients up to jitter_s apart (steps take 4 ms and up):
    the engine's busy time and its split by phase hold at 1 and 3 ms, each long prompt's own
    prefill cost at 1 ms (at 3 ms, outputs of one step pass those of the next, and the steps
    seen no longer match the engine's)."""
    records, truth = _served(_mixed_arrivals(seed), seed, jitter_s)
    estimate = estimate_costs(records, lambda r: 0, BUDGET)
    assert set(estimate) == set(truth)
    true_p = sum(p for p, _ in truth.values())
    true_d = sum(d for _, d in truth.values())
    est_p = sum(c.prefill_engine_s for c in estimate.values())
    est_d = sum(c.decode_engine_s for c in estimate.values())
    # the engine's busy time is what the steps took, whoever the estimate gives it to
    assert est_p + est_d == pytest.approx(true_p + true_d, rel=0.03)
    assert est_p == pytest.approx(true_p, rel=0.1) and est_d == pytest.approx(true_d, rel=0.1)
    if jitter_s > 0.001:  # with jitter near the step time, only the totals hold
        return
    longs = [i for i, r in enumerate(records) if r.prompt_len >= 2500]
    for i in longs:  # the prompts that dominate the cost are charged what they took
        assert estimate[i].prefill_engine_s == pytest.approx(truth[i][0], rel=0.2), i


def test_idle_gaps_are_not_charged_and_engines_are_apart():
    """Two engines, requests far apart: each request pays its own steps only (and the time
    its request took to reach the engine, which a client cannot tell from engine time)."""
    arrivals = [(0.0, 500, 10), (5.0, 500, 10)]
    records, truth = _served(arrivals, seed=0, jitter_s=0.0)
    estimate = estimate_costs(records, lambda r: r.index % 2, BUDGET)
    for i in (0, 1):
        assert estimate[i].engine_s == pytest.approx(sum(truth[i]), abs=0.01)
        assert estimate[i].engine_s < 0.5  # the 5 s between them is idle, nobody's cost


def test_failed_requests_have_no_estimate():
    records, _ = _served([(0.0, 100, 4), (0.01, 100, 4)], seed=0)
    records[1].error = "HTTP 500"
    assert set(estimate_costs(records, lambda r: 0, BUDGET)) == {0}


def test_bench_compare_reports_the_estimate_for_plain_vllm():
    """The `vllm` target's records get estimated engine-seconds (request i went to engine i
    mod 2); the results table marks them estimated, with no KV or dollar figures, and the
    per-length table shows the prefill cost per prompt token rising with length."""
    from benchmarks.compare import estimate_from_arrivals
    from benchmarks.compare_report import markdown
    from benchmarks.summary import SLO, summarize

    records, truth = _served(_mixed_arrivals(5, n=40), seed=5)
    for record in records:  # one engine served them all: give every other one to engine 1
        record.index = 2 * record.index
    estimate_from_arrivals(records, 2, BUDGET)
    assert all(r.estimated_cost and r.cost is r.estimated_cost for r in records)
    summary = summarize("vllm", 4.0, records, SLO(1000, 100), 1024)
    assert summary.cost_estimated
    assert set(summary.cost_per_1k_tokens) == {"prefill_engine_s", "decode_engine_s"}
    true_total = sum(p + d for p, d in truth.values())
    tokens = sum(r.num_output_tokens for r in records)
    assert sum(summary.cost_per_1k_tokens.values()) * tokens / 1e3 == pytest.approx(
        true_total, rel=0.03)
    per_token = summary.prefill_us_per_token
    assert per_token["4K+"] > per_token["<1K"]  # the synthetic engine's attention term
    text = markdown("t", [summary], SLO(1000, 100), [])
    assert "| vllm (estimated) | " in text and "| n/a | n/a | n/a |" in text
