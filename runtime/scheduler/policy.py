"""The per-request decision: lane, mode, replicas, admission.

Rules, in order (each decision's `reason` says which applied):
  1. Lane: a prompt of `long_prompt_tokens` or more is long; with `long_prefill_ms` set, so is
     one whose predicted prefill (prompt / median measured prefill throughput) takes longer.
     Long prompts go only to long-lane prefill replicas, short ones only to short-lane ones, so
     a short prompt never queues behind a long prefill. (A lane without replicas borrows the
     other lane's.)
  2. Prefill replica: least predicted wait = pending prompt tokens / measured tokens per second,
     counting what this scheduler dispatched since the replica's last report; a stale report is
     replaced by the scheduler's own count of outstanding tokens.
  3. Decode replica: only replicas whose KV cache can hold prompt + max_tokens at all; among
     them, those with the blocks free now and a free sequence slot first, then fewest active
     sequences, then most free blocks.
  4. Mode: local (the decode replica prefills the prompt itself, no transfer) when the prompt is
     at most `local_max_prompt_tokens`, the decode replica has room now, and its predicted local
     prefill ends no later than the disaggregated path would have the KV on it (prefill wait +
     prefill + transfer + the extra hop). A decode replica's prefill speed is measured from its
     local prefills; until then it is taken to be the prefill pool's. Otherwise disaggregated.
  5. Colocated serving (`disaggregation` off): every request is local, on the decode replica
     with the fewest prompt tokens waiting to be prefilled, then the fewest active sequences
     (a least-loaded router over engines that each prefill and decode).
  6. Admission (off unless `admission_ttft_ms` is set): a request whose predicted TTFT exceeds
     it is rejected now, with a Retry-After of the excess, instead of queueing to miss its SLO.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.scheduler.loads import DecodeTable, PrefillTable
from runtime.scheduler.types import Decision, Lane, Rejection, RequestInfo


@dataclass(frozen=True)
class PolicyConfig:
    long_prompt_tokens: int = 4096
    long_prefill_ms: float | None = None
    stale_after_s: float = 2.0
    local_max_prompt_tokens: int = 512
    kv_bytes_per_token: int = 131072  # Llama-3-8B bf16: 2 * 32 layers * 8 heads * 128 * 2 B
    link_bytes_per_s: float = 5e9
    transfer_latency_ms: float = 0.5
    split_overhead_ms: float = 5.0  # the extra hop to a prefill replica and back
    admission_ttft_ms: float | None = None
    disaggregation: bool = True

    def transfer_ms(self, num_tokens: int) -> float:
        return self.transfer_latency_ms + 1e3 * num_tokens * self.kv_bytes_per_token \
            / self.link_bytes_per_s


class GlobalScheduler:
    """Decides and books each request; the tables are updated by reports and completions."""

    def __init__(self, config: PolicyConfig, prefill: PrefillTable, decode: DecodeTable):
        self.config = config
        self.prefill = prefill
        self.decode = decode
        self.refresh_lanes()

    def refresh_lanes(self) -> None:
        """Recompute lane membership (call after adding replicas)."""
        is_long = self.prefill.is_long
        self._lane_masks = {"long": is_long, "short": ~is_long}
        for lane, mask in self._lane_masks.items():
            if not mask.any():
                self._lane_masks[lane] = np.ones_like(mask)

    def lane(self, prompt_len: int) -> Lane:
        if prompt_len >= self.config.long_prompt_tokens:
            return "long"
        if self.config.long_prefill_ms is not None:
            typical_tps = float(np.median(self.prefill.tokens_per_s))
            if 1e3 * prompt_len / typical_tps >= self.config.long_prefill_ms:
                return "long"
        return "short"

    def decide(self, request: RequestInfo, now_s: float) -> Decision | Rejection:
        """Choose lane, mode and replicas for one request, and book it. Side effect: the
        chosen replicas' counts include this request from now on."""
        lane = self.lane(request.prompt_len)
        if not self.config.disaggregation:
            return self._colocated(request, lane)
        d = self._place_decode(request)
        if d is None:
            return _no_room(request)
        waits = self.prefill.predicted_wait_s(now_s, self.config.stale_after_s)
        candidates = np.flatnonzero(self._lane_masks[lane])
        p = int(candidates[np.argmin(waits[candidates])])
        tps = self.prefill.tokens_per_s[p]
        disagg_ttft_ms = 1e3 * (waits[p] + request.prompt_len / tps)
        disagg_ready_ms = disagg_ttft_ms + self.config.transfer_ms(request.prompt_len) \
            + self.config.split_overhead_ms
        local_tps = self.decode.prefill_tokens_per_s[d] if self.decode.prefill_measured[d] \
            else float(np.median(self.prefill.tokens_per_s))
        local_ttft_ms = 1e3 * (self.decode.local_pending[d] + request.prompt_len) / local_tps
        blocks = self.decode.blocks_for(request.prompt_len + request.max_tokens)
        has_room = bool(self.decode.free_blocks[d] >= blocks
                        and self.decode.active_seqs[d] < self.decode.max_num_seqs[d])
        local = (request.prompt_len <= self.config.local_max_prompt_tokens and has_room
                 and local_ttft_ms <= disagg_ready_ms)
        ttft_ms = local_ttft_ms if local else disagg_ttft_ms
        slo = self.config.admission_ttft_ms
        if slo is not None and ttft_ms > slo:
            return Rejection(f"predicted TTFT {ttft_ms:.0f} ms > SLO {slo:.0f} ms",
                             retry_after_s=(ttft_ms - slo) / 1e3)
        self.decode.placed(d, blocks, request.prompt_len if local else 0)
        if local:
            return Decision(lane, "local", None, self.decode.ids[d], local_ttft_ms,
                            f"local prefill {local_ttft_ms:.1f} ms <= split "
                            f"{disagg_ready_ms:.1f} ms")
        self.prefill.dispatched(p, request.prompt_len)
        reason = ("prompt too long for local" if request.prompt_len
                  > self.config.local_max_prompt_tokens else
                  "decode replica busy" if not has_room else
                  f"split {disagg_ready_ms:.1f} ms < local {local_ttft_ms:.1f} ms")
        return Decision(lane, "disaggregated", self.prefill.ids[p], self.decode.ids[d],
                        disagg_ttft_ms, reason)

    def _colocated(self, request: RequestInfo, lane: Lane) -> Decision | Rejection:
        table = self.decode
        blocks = table.blocks_for(request.prompt_len + request.max_tokens)
        candidates = np.flatnonzero(table.total_blocks >= blocks)
        if not len(candidates):
            return _no_room(request)
        # least loaded: fewest prompt tokens queued for prefill, then fewest sequences
        score = table.local_pending[candidates] * (table.max_num_seqs.max() + 1) \
            + table.active_seqs[candidates]
        d = int(candidates[np.argmin(score)])
        tps = table.prefill_tokens_per_s[d]
        ttft_ms = 1e3 * (table.local_pending[d] + request.prompt_len) / tps
        slo = self.config.admission_ttft_ms
        if slo is not None and ttft_ms > slo:
            return Rejection(f"predicted TTFT {ttft_ms:.0f} ms > SLO {slo:.0f} ms",
                             retry_after_s=(ttft_ms - slo) / 1e3)
        table.placed(d, blocks, request.prompt_len)
        return Decision(lane, "local", None, table.ids[d], ttft_ms,
                        f"colocated: least-loaded engine ({table.local_pending[d]:.0f} "
                        f"tokens queued, {table.active_seqs[d]} sequences)")

    def _place_decode(self, request: RequestInfo) -> int | None:
        table = self.decode
        blocks = table.blocks_for(request.prompt_len + request.max_tokens)
        can_fit = table.total_blocks >= blocks
        if not can_fit.any():
            return None
        room_now = can_fit & (table.free_blocks >= blocks) & (table.active_seqs
                                                             < table.max_num_seqs)
        pool = room_now if room_now.any() else can_fit
        candidates = np.flatnonzero(pool)
        # fewest active sequences, then most free blocks
        score = table.active_seqs[candidates] * (table.total_blocks.max() + 1) \
            - table.free_blocks[candidates]
        return int(candidates[np.argmin(score)])


def _no_room(request: RequestInfo) -> Rejection:
    return Rejection(
        f"no decode replica can hold {request.prompt_len + request.max_tokens} tokens",
        retry_after_s=0.0,
    )
