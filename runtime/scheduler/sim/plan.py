"""Capacity planning: which prefill:decode split serves a workload best, by simulation.

For each split of `num_replicas` into prefill and decode replicas, static disaggregation and the
policy are simulated on the same trace (the policy's long lane gets the share of prefill
replicas that long prompts take of the prefill work); colocated serving uses all replicas. The
split with the highest goodput (requests meeting both SLOs per second) wins. Each row's summary
also says what a request costs at that split and load (prefill and decode engine-seconds, KV
block-seconds, bytes moved, dollars at each pool's price per replica-hour) and how much of the
cluster's time went to no request (idle), with the live runtime's accounting (accounting.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from runtime.scheduler.policy import PolicyConfig
from runtime.scheduler.sim.cost_model import CostModel
from runtime.scheduler.sim.report import RunSummary, summarize
from runtime.scheduler.sim.simulator import ClusterSpec, SimMode, simulate
from runtime.scheduler.sim.workload import TraceRequest


@dataclass(frozen=True)
class PlanRow:
    mode: SimMode
    num_prefill: int
    num_decode: int
    num_long_prefill: int
    summary: RunSummary


def long_prefill_share(
    cost: CostModel, trace: list[TraceRequest], long_prompt_tokens: int
) -> float:
    work = [cost.prefill_s(r.prompt_len) for r in trace]
    long_work = sum(w for w, r in zip(work, trace, strict=True)
                    if r.prompt_len >= long_prompt_tokens)
    return long_work / sum(work)


def policy_config(cost: CostModel, long_prompt_tokens: int, **overrides: object) -> PolicyConfig:
    base = PolicyConfig(long_prompt_tokens=long_prompt_tokens,
                        kv_bytes_per_token=cost.model.kv_bytes_per_token,
                        link_bytes_per_s=cost.hardware.link_bytes_per_s)
    return replace(base, **overrides)  # type: ignore[arg-type]


def plan(cost: CostModel, trace: list[TraceRequest], num_replicas: int, ttft_slo_ms: float,
         tpot_slo_ms: float, long_prompt_tokens: int = 16384, progress: bool = False,
         prefill_cost_per_replica_hour: float = 0.0,
         decode_cost_per_replica_hour: float = 0.0) -> list[PlanRow]:
    """Every split for static and policy, plus colocated (at the decode price); best goodput
    first. Prices 0: costs in engine-seconds only, as the live app's default."""
    share = long_prefill_share(cost, trace, long_prompt_tokens)
    config = policy_config(cost, long_prompt_tokens,
                           tpot_price=ttft_slo_ms / tpot_slo_ms)

    def ideal_ms(prompt_len: int) -> float:
        return 1e3 * cost.prefill_s(prompt_len)

    def cluster(mode: SimMode, num_prefill: int, num_decode: int,
                num_long: int = 0) -> ClusterSpec:
        return ClusterSpec(mode, num_prefill, num_decode, num_long_prefill=num_long,
                           policy=config,
                           prefill_cost_per_replica_hour=prefill_cost_per_replica_hour,
                           decode_cost_per_replica_hour=decode_cost_per_replica_hour)

    rows = [PlanRow("colocated", num_replicas, 0, 0, summarize(
        simulate(cluster("colocated", num_replicas, 0), cost, trace), long_prompt_tokens,
        ttft_slo_ms, tpot_slo_ms, ideal_ms))]
    for num_prefill in range(1, num_replicas):
        num_decode = num_replicas - num_prefill
        num_long = min(num_prefill - 1, max(1, round(share * num_prefill))) \
            if num_prefill > 1 else 0
        modes: tuple[SimMode, ...] = ("static", "policy")
        for mode in modes:
            spec = cluster(mode, num_prefill, num_decode, num_long)
            summary = summarize(simulate(spec, cost, trace), long_prompt_tokens, ttft_slo_ms,
                                tpot_slo_ms, ideal_ms)
            rows.append(PlanRow(spec.mode, num_prefill, num_decode, num_long, summary))
        if progress:
            print(f"  split {num_prefill}:{num_decode} simulated", flush=True)
    return sorted(rows, key=lambda row: -row.summary.goodput_rps)
