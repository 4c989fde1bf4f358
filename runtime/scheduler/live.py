"""The policy as the ingress runs it: tables that grow as replicas report, and the bookkeeping
of each request's start and end. Still no Ray here (the ingress feeds it)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from runtime.scheduler.loads import DecodeTable, PrefillTable
from runtime.scheduler.policy import GlobalScheduler, PolicyConfig
from runtime.scheduler.types import (
    Decision,
    DecodeLoad,
    Lane,
    PrefillLoad,
    Rejection,
    ReplicaReport,
    RequestInfo,
)


@dataclass(frozen=True)
class LiveConfig:
    policy: PolicyConfig
    num_long_lane_replicas: int  # the first prefill replicas to report serve the long lane
    block_size: int
    max_num_seqs: int
    default_tokens_per_s: float = 5000.0


class LiveScheduler:
    def __init__(self, config: LiveConfig) -> None:
        self.config = config
        self.prefill = PrefillTable([], [], config.default_tokens_per_s)
        self.decode = DecodeTable([], [], config.block_size, config.max_num_seqs,
                                  config.default_tokens_per_s)
        self.policy = GlobalScheduler(config.policy, self.prefill, self.decode)
        self.decisions: Counter[tuple[str, str]] = Counter()  # (lane, mode)
        self.in_flight: Counter[str] = Counter()  # by lane

    @property
    def ready(self) -> bool:
        has_prefill = bool(self.prefill.ids) or not self.config.policy.disaggregation
        return has_prefill and bool(self.decode.ids)

    def report(self, report: ReplicaReport) -> None:
        now = time.monotonic() - max(0.0, time.time() - report.reported_at_s)
        if report.role == "prefill":
            if report.replica_id not in self.prefill.index:
                num_long = int(self.prefill.is_long.sum())
                lane: Lane = "long" if num_long < self.config.num_long_lane_replicas else "short"
                self.prefill.add(report.replica_id, lane)
                self.policy.refresh_lanes()
            i = self.prefill.index[report.replica_id]
            self.prefill.report(PrefillLoad(report.replica_id,
                                            "long" if self.prefill.is_long[i] else "short",
                                            report.num_pending_tokens, 0.0, now))
        else:
            if report.replica_id not in self.decode.index:
                self.decode.add(report.replica_id, report.num_total_blocks)
            self.decode.report(DecodeLoad(report.replica_id, report.num_free_blocks,
                                          report.block_size, report.num_active_seqs,
                                          report.max_num_seqs, 0.0, now))

    def decide(self, request_id: str, prompt_len: int, max_tokens: int) -> Decision | Rejection:
        assert self.ready, "decide before any replica reported"
        info = RequestInfo(request_id, prompt_len, max_tokens, time.monotonic())
        decision = self.policy.decide(info, time.monotonic())
        if isinstance(decision, Decision):
            self.decisions[(decision.lane, decision.mode)] += 1
            self.in_flight[decision.lane] += 1
        return decision

    def prefill_done(self, decision: Decision, prompt_len: int, compute_ms: float) -> None:
        if decision.prefill_replica in self.prefill.index:
            self.prefill.finished(decision.prefill_replica, prompt_len, compute_ms / 1e3)
        elif decision.mode == "local" and decision.decode_replica in self.decode.index:
            self.decode.local_prefill_finished(self.decode.index[decision.decode_replica],
                                               prompt_len, compute_ms / 1e3)

    def request_done(self, decision: Decision, prompt_len: int, max_tokens: int,
                     prefilled: bool) -> None:
        """The request ended (done, failed or aborted); `prefilled`: prefill_done was called."""
        self.in_flight[decision.lane] -= 1
        if not prefilled:
            self.prefill_done(decision, prompt_len, 0.0)
        if decision.decode_replica in self.decode.index:
            self.decode.released(decision.decode_replica,
                                 self.decode.blocks_for(prompt_len + max_tokens))

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        waits = self.prefill.predicted_wait_s(now, self.config.policy.stale_after_s)
        return {
            "lanes": {lane: {"in_flight": self.in_flight[lane]} for lane in ("short", "long")},
            "prefill": [
                {"replica": rid, "lane": "long" if self.prefill.is_long[i] else "short",
                 "pending_tokens": float(self.prefill.reported_pending[i]
                                         + self.prefill.sent_since_report[i]),
                 "tokens_per_s": float(self.prefill.tokens_per_s[i]),
                 "predicted_wait_ms": float(1e3 * waits[i]),
                 "report_age_s": float(now - self.prefill.reported_at[i])}
                for i, rid in enumerate(self.prefill.ids)
            ],
            "decode": [
                {"replica": rid, "free_blocks": int(self.decode.free_blocks[i]),
                 "total_blocks": int(self.decode.total_blocks[i]),
                 "active_seqs": int(self.decode.active_seqs[i])}
                for i, rid in enumerate(self.decode.ids)
            ],
            "decisions": {f"{lane}/{mode}": n for (lane, mode), n in self.decisions.items()},
        }
