"""Pools that size themselves on the global scheduler's signals, through Serve's autoscaler.

  1. The ingress computes each pool's demand from its own books (`pool_demand`): the prefill
     pool from the prefill work waiting and running on it (predicted ms, quadratic in each
     prompt, long prompts held in the ingress included) against the TTFT budget; the decode
     pool from its KV cache usage, its sequences and its TPOT against their targets. Demand is
     "replicas needed now" (a float).
  2. Every replica's load report gets its pool's demand back; the replica hands it to Serve
     (`record_autoscaling_stats`), so Serve's controller sees the scheduler's signal, not a
     request count (a 10K-token prompt is not ten 1K-token ones).
  3. In the controller, `PoolAutoscaler` turns the demand into a replica count: up only when
     demand stayed above the current count for `upscale_delay_s`, down one replica at a time
     when it stayed below for `downscale_delay_s` (no flapping on noise), always within
     [min_replicas, max_replicas] (Serve applies the bounds too).
  4. A replica Serve removes is drained by Serve: it gets no new request and finishes the ones
     it has within graceful_shutdown_timeout_s; the scheduler stops choosing it when its
     reports stop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEMAND_METRIC = "disagg_demand_replicas"


class AutoscalingSpec(BaseModel):
    """A pool's replica bounds and cooldowns (app config: `prefill.autoscaling`, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=1, description="Never fewer replicas.")
    max_replicas: int = Field(2, ge=1, description="Never more replicas.")
    upscale_delay_s: float = Field(
        5.0, ge=0, description="Demand must stay above the replica count this long to scale up.")
    downscale_delay_s: float = Field(
        30.0, ge=0, description="Demand must stay below it this long to remove a replica.")
    target_utilization: float = Field(
        0.8, gt=0, le=1, description="Share of a replica's capacity the demand may fill: "
        "prefill, of the TTFT budget; decode, of its KV cache and sequence slots.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling: min_replicas ({self.min_replicas}) > max_replicas "
                             f"({self.max_replicas})")
        return self


@dataclass(frozen=True)
class Demand:
    """Replicas a pool needs now, and why."""

    replicas: float
    signal: float  # the measured quantity (ms of work per replica, or a usage fraction)
    target: float
    reason: str


def prefill_demand(remaining_ms: float, num_replicas: int, ttft_budget_ms: float,
                   utilization: float) -> Demand:
    """Prefill work waiting and running (predicted ms) spread so that no replica has more
    than utilization x the TTFT budget queued."""
    per_replica = remaining_ms / max(1, num_replicas)
    target = utilization * ttft_budget_ms
    return Demand(remaining_ms / target, per_replica, target,
                  f"{remaining_ms:.0f} ms of prefill work queued, target {target:.0f} ms per "
                  "replica")


def decode_demand(kv_usage: list[float], num_seqs: list[float], max_num_seqs: int,
                  tpot_ms: list[float], tpot_budget_ms: float, utilization: float) -> Demand:
    """The tightest of KV cache, sequence slots and TPOT, against its target."""
    n = max(1, len(kv_usage))
    loads = {
        "KV cache usage": (sum(kv_usage) / n, utilization),
        "sequences per slot": (sum(num_seqs) / (n * max_num_seqs), utilization),
        "TPOT ms": (max(tpot_ms, default=0.0), utilization * tpot_budget_ms),
    }
    name, (signal, target) = max(loads.items(), key=lambda kv: kv[1][0] / kv[1][1])
    return Demand(n * signal / target, signal, target,
                  f"{name} {signal:.2f} against a target of {target:.2f}")


class PoolAutoscaler:
    """Serve's custom autoscaling policy for one pool (`policy_function`, instantiated once
    with `policy_kwargs`, called by the controller every autoscaling tick)."""

    def __init__(self, upscale_delay_s: float, downscale_delay_s: float,
                 min_replicas: int, max_replicas: int) -> None:
        self.upscale_delay_s = upscale_delay_s
        self.downscale_delay_s = downscale_delay_s
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        reported = list((metrics.get(DEMAND_METRIC) or {}).values())
        demand = max(reported) if reported else None
        now = ctx.current_time if ctx.current_time is not None else 0.0
        return self.decide(ctx.target_num_replicas, demand, now, dict(ctx.policy_state or {}))

    def decide(self, current: int, demand: float | None, now_s: float,
               state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The replica count to ask for, and the state to keep until the next call."""
        if demand is None:  # no report yet: keep what there is
            return current, state
        wanted = min(self.max_replicas, max(self.min_replicas, math.ceil(demand - 1e-9)))
        direction = "up" if wanted > current else "down" if wanted < current else ""
        if not direction:
            state.pop("since", None)
            state.pop("direction", None)
            return current, state
        if state.get("direction") != direction:
            state.update(direction=direction, since=now_s)
        waited = now_s - float(state["since"])
        delay = self.upscale_delay_s if direction == "up" else self.downscale_delay_s
        if waited < delay:
            return current, state
        state.pop("since", None)
        state.pop("direction", None)
        decision = wanted if direction == "up" else current - 1
        state["last"] = {"at_s": now_s, "from": current, "to": decision,
                         "demand": round(demand, 2)}
        return decision, state
