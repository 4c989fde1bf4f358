"""The policy as the ingress runs it: tables that grow as replicas report, and the bookkeeping
of each request's start, first token and end. Still no Ray here (the ingress feeds it).

Lifecycle of one request's booking:
  1. `decide` books its prefill on the chosen engine and its sequence on the decode replica;
     a long prompt then waits for its `turn` (one long prefill per engine at a time);
  2. `first_token` (its first token reached the ingress) clears the prefill from the engine's
     books; `prefill_measured` (its timings arrived) feeds the engine's prefill model when the
     prompt ran alone there;
  3. `request_done` (however it ended) releases the decode booking, and the prefill booking if
     the request ended before its first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.autoscaling import Demand, decode_demand, prefill_demand
from runtime.scheduler.loads import DecodeTable, PrefillTable, ReplicaColumns
from runtime.scheduler.policy import GlobalScheduler, PolicyConfig
from runtime.scheduler.prefill_model import PrefillModel
from runtime.scheduler.rebind import CHECK_EVERY_S, look
from runtime.scheduler.types import (
    Decision,
    DecodeLoad,
    Engine,
    Lane,
    PrefillLoad,
    Rejection,
    ReplicaReport,
    RequestInfo,
)

if TYPE_CHECKING:
    from runtime.messages import PhaseTimings

HELD_NOTE_MS = 500.0  # a long prompt held this long says why it stayed, in its decision_reason
# With no replica of either pool reported within stale_after_s, their last reports still count
# for this long: a stall of the ingress's own loop makes every report late at once.
LATE_READS_GRACE_S = 5.0


@dataclass(frozen=True)
class LiveConfig:
    policy: PolicyConfig
    num_long_lane_replicas: int  # the first prefill replicas to report serve the long lane
    block_size: int
    max_num_seqs: int
    chunk_tokens: int = 512  # the engines' long_prefill_token_threshold
    ttft_budget_ms: float = 1000.0  # what the prefill pool's queue may hold (autoscaling)
    prefill_utilization: float = 0.8
    decode_utilization: float = 0.8
    step_tokens: int = 2048  # the engines' max_num_batched_tokens
    default_tokens_per_s: float = 5000.0  # the prefill model before any calibration


class LiveScheduler:
    def __init__(self, config: LiveConfig) -> None:
        self.config = config
        prior = PrefillModel.from_throughput(config.default_tokens_per_s)
        self.prefill = PrefillTable([], [], prior, config.chunk_tokens, config.step_tokens,
                                    config.block_size, config.max_num_seqs)
        self.decode = DecodeTable([], [], config.block_size, config.max_num_seqs, prior,
                                  config.chunk_tokens, config.step_tokens)
        self.policy = GlobalScheduler(config.policy, self.prefill, self.decode)
        self.decisions: Counter[tuple[str, str]] = Counter()  # (lane, mode)
        self.in_flight: Counter[str] = Counter()  # by lane
        self._long_done = asyncio.Event()  # set (and replaced) whenever a long prefill ends
        self.num_moved = 0  # long prompts moved to another engine while they waited

    @property
    def ready(self) -> bool:
        has_prefill = bool(self.prefill.ids) or not self.config.policy.disaggregation
        return has_prefill and bool(self.decode.ids)

    def report(self, report: ReplicaReport) -> None:
        now = time.monotonic() - max(0.0, time.time() - report.reported_at_s)
        if report.role == "prefill":
            i = self.prefill.index.get(report.replica_id)
            if i is None:
                num_long = int(self.prefill.is_long.sum())
                lane: Lane = "long" if num_long < self.config.num_long_lane_replicas else "short"
                i = self.prefill.add(report.replica_id, lane)
                self.policy.refresh_lanes()
                self.prefill.work.learn(i, [(n, ms) for n, ms in report.calibration])
            self.prefill.report(PrefillLoad(report.replica_id,
                                            "long" if self.prefill.is_long[i] else "short",
                                            report.num_pending_tokens, now, report.healthy,
                                            report.num_free_blocks, report.num_total_blocks,
                                            report.num_active_seqs, report.max_num_seqs))
            self.prefill.report_decode_step(i, report.decode_step_ms)
            self.prefill.work.refit_pending(i)
        else:
            i = self.decode.index.get(report.replica_id)
            if i is None:
                i = self.decode.add(report.replica_id, report.num_total_blocks)
                self.decode.work.learn(i, [(n, ms) for n, ms in report.calibration])
            self.decode.report(DecodeLoad(report.replica_id, report.num_free_blocks,
                                          report.block_size, report.num_active_seqs,
                                          report.max_num_seqs, now, report.healthy))
            self.decode.report_decode_step(i, report.decode_step_ms)
            self.decode.work.refit_pending(i)

    def decide(self, request_id: str, prompt_len: int, max_tokens: int,
               one_engine: bool = False) -> Decision | Rejection:
        assert self.ready, "decide before any replica reported"
        now = time.monotonic()
        info = RequestInfo(request_id, prompt_len, max_tokens, now, one_engine)
        decision = self.policy.decide(info, now)
        if isinstance(decision, Rejection) and decision.unavailable and self._reads_late(now):
            # every replica of both pools went quiet at once and none failed a call: this
            # ingress was late reading their reports (a stall here), they did not all die
            config = self.policy.config
            self.policy.config = replace(config, stale_after_s=LATE_READS_GRACE_S)
            try:
                decision = self.policy.decide(info, now)
            finally:
                self.policy.config = config
        if isinstance(decision, Decision):
            self.decisions[(decision.lane, decision.mode)] += 1
            self.in_flight[decision.lane] += 1
        return decision

    def _reads_late(self, now_s: float) -> bool:
        """No replica of either pool is live, yet some reported within LATE_READS_GRACE_S,
        healthy, with no failed call since."""
        return any(table.live(now_s, LATE_READS_GRACE_S).any()
                   for table in (self.prefill, self.decode))

    def demand(self, role: str) -> Demand:
        """What the pool needs now, in replicas (runtime/autoscaling.py)."""
        now, stale = time.monotonic(), self.config.policy.stale_after_s
        if role == "prefill":
            live = self.prefill.live(now, stale)
            short, long_ = self.prefill.work.remaining_ms(now)
            return prefill_demand(float((short + long_)[live].sum()), int(live.sum()),
                                  self.config.ttft_budget_ms, self.config.prefill_utilization)
        table = self.decode
        live = table.live(now, stale)
        usage = 1.0 - table.free_blocks[live] / np.maximum(table.total_blocks[live], 1)
        return decode_demand(list(usage), list(table.active_seqs[live].astype(float)),
                             self.config.max_num_seqs, list(table.tpot_ms[live]),
                             self.config.policy.tpot_budget_ms,
                             self.config.decode_utilization)

    def replica_failed(self, role: str, replica_id: str) -> None:
        """A call to the replica failed as a replica: choose it no more until it reports."""
        self.policy.replica_failed(role, replica_id, time.monotonic())

    def _roles(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.config.policy.disaggregation else ("decode",)

    def health(self) -> dict[str, Any]:
        """Live replicas per pool, and the app's state: ok, degraded (a pool has no live
        replica but the other can serve alone), unavailable, or starting."""
        now, stale = time.monotonic(), self.config.policy.stale_after_s
        pools = {"decode": self.decode.live(now, stale)}
        if self.config.policy.disaggregation:
            pools["prefill"] = self.prefill.live(now, stale)
        view = {name: {"live": int(live.sum()), "replicas": len(live)}
                for name, live in pools.items()}
        if not self.ready:
            status = "starting"
        elif not any(v["live"] for v in view.values()):
            status = "unavailable"
        elif all(v["live"] for v in view.values()):
            status = "ok"
        else:
            status = "degraded"
        return {"status": status, "pools": view}

    async def turn(self, decision: Decision, request_id: str, prompt_len: int,
                   max_tokens: int, one_engine: bool = False) -> Decision | Rejection:
        """Wait until the request may go to its engine: at once for a short prompt; for a
        long one, once every long prompt booked on that engine before it has its first
        token (they would share every engine step otherwise). Returns the decision to run:
        a waiting long prompt moves to another engine when its own is late or another is
        clearly earlier (rebind.py); a Rejection if, moved, no replica takes it any more."""
        info = RequestInfo(request_id, prompt_len, max_tokens, time.monotonic(), one_engine)
        seen = ""  # the last comparison of its engine with the others
        while True:
            work = self.policy.table_of(decision).work
            if work.has_turn(request_id):
                held_ms = 1e3 * (time.monotonic() - info.arrival_s)
                if seen and held_ms >= HELD_NOTE_MS:  # why it did not move, in its timings
                    decision = replace(decision, reason=f"{decision.reason}; held "
                                       f"{held_ms:.0f} ms, last look: {seen}")
                return decision
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._long_done.wait(), CHECK_EVERY_S)
            now = time.monotonic()
            why, latest = look(self.policy, decision, info, now)
            seen = latest or seen  # "" once its turn has come
            if why is None:
                continue
            self._release(decision, request_id, prompt_len, max_tokens)
            self.decisions[(decision.lane, decision.mode)] -= 1
            moved = self.policy.decide(info, now, avoid=Engine.of(decision))
            if isinstance(moved, Rejection):
                self.in_flight[decision.lane] -= 1
                return moved
            self.decisions[(moved.lane, moved.mode)] += 1
            self.num_moved += 1
            decision = replace(moved, reason=f"{moved.reason}; moved: {why}")

    def first_token(self, decision: Decision, request_id: str) -> bool | None:
        """Returns whether the prompt ran alone on its engine (None: not booked any more)."""
        clean = self.policy.first_token(decision, request_id, time.monotonic())
        if clean is not None and decision.lane == "long":
            self._long_done.set()
            self._long_done = asyncio.Event()
        return clean

    def prefill_measured(self, decision: Decision, num_tokens: int, compute_ms: float,
                         clean: bool | None) -> None:
        if compute_ms > 0:
            self.policy.learn(decision, num_tokens, compute_ms, alone=bool(clean))

    def handoff_measured(self, timings: PhaseTimings, alone: bool | None) -> None:
        """A split request's hop and transfer as measured (handoff.py): the hop only from a
        prompt that ran alone on its engine; nothing from one retried or served otherwise."""
        if timings.mode == "disaggregated" and not timings.num_retries and not timings.degraded \
                and timings.prefill_compute_ms > 0:
            engine_ms = timings.scheduler_queue_ms + timings.prefill_queue_ms \
                + timings.prefill_compute_ms
            computed = timings.num_prompt_tokens - timings.num_cached_prompt_tokens
            self.policy.handoff.observe(timings.ttft_ms - engine_ms if alone else None,
                                        computed, timings.kv_transfer_exposed_ms)

    def progressed(self, decision: Decision, num_tokens: int, max_tokens: int) -> None:
        """The request generated num_tokens more (the policy counts the tokens each
        sequence still decodes where it runs)."""
        table, replica = self._sequence_at(decision)
        table.progressed(replica, num_tokens, num_tokens / max(1, max_tokens))

    def request_done(self, decision: Decision, request_id: str, prompt_len: int,
                     max_tokens: int, tpot_ms: float = 0.0, num_output_tokens: int = 0,
                     num_progressed: int = 0) -> None:
        """The request ended (done, failed or aborted; num_output_tokens: what one that ran
        to its end generated; num_progressed: the tokens `progressed` reported)."""
        self.in_flight[decision.lane] -= 1
        if num_output_tokens > 0:
            self.policy.output_seen(num_output_tokens, max_tokens)
        self._release(decision, request_id, prompt_len, max_tokens, tpot_ms, num_progressed)

    def _release(self, decision: Decision, request_id: str, prompt_len: int, max_tokens: int,
                 tpot_ms: float = 0.0, num_progressed: int = 0) -> None:
        """The request's bookings leave the books: its prefill (unless done) and sequence."""
        self.first_token(decision, request_id)  # no-op unless it ended before
        table, replica = self._sequence_at(decision)
        if replica in table.index:
            table.released(replica, table.blocks_for(prompt_len + max_tokens), max_tokens,
                           tpot_ms, num_progressed)

    def _sequence_at(self, decision: Decision) -> tuple[ReplicaColumns, str]:
        """The table and replica where the request's sequence decodes."""
        if decision.mode == "prefill_local":
            return self.prefill, decision.prefill_replica or ""
        return self.decode, decision.decode_replica or ""

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        p_short, p_long = self.prefill.work.remaining_ms(now)
        d_short, d_long = self.decode.work.remaining_ms(now)
        return {
            "lanes": {lane: {"in_flight": self.in_flight[lane]} for lane in ("short", "long")},
            "prefill": [
                {"replica": rid, "lane": "long" if self.prefill.is_long[i] else "short",
                 "pending_tokens": float(self.prefill.reported_pending[i]),
                 "outstanding": int(self.prefill.work.num_outstanding[i]),
                 "remaining_ms": {"short": float(p_short[i]), "long": float(p_long[i])},
                 "model": _model(self.prefill.work.model(i)),
                 "decode_step": _step(self.prefill, i),
                 "report_age_s": float(now - self.prefill.reported_at[i])}
                for i, rid in enumerate(self.prefill.ids)
            ],
            "decode": [
                {"replica": rid, "free_blocks": int(self.decode.free_blocks[i]),
                 "total_blocks": int(self.decode.total_blocks[i]),
                 "active_seqs": int(self.decode.active_seqs[i]),
                 "tpot_ms": float(self.decode.tpot_ms[i]),
                 "local_remaining_ms": {"short": float(d_short[i]), "long": float(d_long[i])},
                 "model": _model(self.decode.work.model(i)),
                 "decode_step": _step(self.decode, i)}
                for i, rid in enumerate(self.decode.ids)
            ],
            "decisions": {f"{lane}/{mode}": n for (lane, mode), n in self.decisions.items()},
            "moved": self.num_moved,
            "handoff": self.policy.handoff.snapshot(),
            "demand": {role: asdict(self.demand(role)) for role in self._roles()},
        }


def _step(table: ReplicaColumns, i: int) -> dict[str, Any]:
    """The replica's decode step model as status shows it (step_model.py)."""
    s0, s1 = (float(v[i]) for v in table.decode_step())
    return {"s0_ms": s0, "s1_ms_per_seq": s1,
            "fitted": bool(np.isfinite(table.step_s0_ms[i]))}


def _model(model: PrefillModel) -> dict[str, float]:
    """The prefill model as status shows it, with what it predicts for a few lengths."""
    return {"a_ms": model.a_ms, "b_ms_per_token": model.b_ms,
            "c_ms_per_token2": model.c_ms,
            **{f"predicted_ms_{n}": model.predict_ms(n) for n in (128, 1024, 4096, 8192)}}
