"""The per-request decision: lane, mode, replicas, admission.

Every prefill time below is a replica's own quadratic model (prefill_model.py, calibrated at
start and refitted online) applied to the work booked on it (work.py): engines run short
prompts first and cap a long prefill's share of each step, so a short prompt waits for the
short work ahead of it plus one chunk of a long prefill per step it shares with one; a long
prompt waits for everything ahead of it.

Rules, in order (each decision's `reason` says which applied):
  1. Lane: a prompt of `long_prompt_tokens` or more is long; with `long_prefill_ms` set, so is
     one whose predicted prefill takes longer. With long-lane replicas configured, long
     prompts go only to them and short ones only to the others (a lane without replicas
     borrows the other lane's).
  2. Decode replica for the split path: only replicas whose KV cache can hold prompt +
     max_tokens at all; among them, those with the blocks free now and a free sequence slot
     first, then fewest active sequences, then most free blocks.
  3. Prefill replica: the earliest predicted first token.
  4. Whole on a prefill replica (`prefill_local`): the prefill replica chosen in 3 decodes
     the request too when that costs less in all than the choice of 5 (first token plus
     decode cost, as in 6; not for a prompt that 5 sends local if it is long, or if it is
     short and the prefill replica has a long prompt to prefill where the decode replica has
     none); and when no decode replica has room (KV, a slot, TPOT within budget), a prefill
     replica with room serves the whole request.
  5. Mode: local (a decode replica prefills the prompt itself, no transfer), on the decode
     replica where it costs the least (as in 6), when its first token there is no later
     than the split path would have the KV on a decode replica (prefill + the extra hop +
     transfer, the last two as measured: handoff.py), the replica has room now, the prompt is
     at most `local_max_prompt_tokens` (if set), and the replica's decodes stay within the
     TPOT budget: the local prefill work outstanding on it, spread over the tokens its
     sequences still decode, may add at most tpot_budget_ms - its recent TPOT to each. A long
     prompt goes local, within the same budget, when its first token there plus what it costs
     the short prompts arriving meanwhile (isolation.py: while every engine prefills a long
     prompt, short ones share their steps with its chunks) and those still prefilling there
     (a chunk each) is less than on the prefill pool;
     rule 4 does not move it back to the prefill pool for the decode time it saves. Otherwise
     disaggregated.
  6. Colocated serving (`disaggregation` off): every request is local, on the engine where
     it costs the least in all: its predicted first token plus its decode cost there
     (decode_cost.py: its TPOT at that engine's step time, s0 + s1 x sequences from the
     engine's own fit, step_model.py, and the prefills sharing its steps; what it adds to
     the others' TPOTs; TPOT ms priced in first-token ms by the SLOs' ratio).
     A request that must run on one engine (structured output: the grammar's state cannot
     move with the KV cache; the prompt's logprobs) is served whole by a prefill replica
     when one has room and is the earlier, or the prompt is long; else as colocated.
  7. Overload: a decode replica holds at most max_num_seqs + `max_queued_per_replica`
     requests; when every live one is full the request is refused (429, Retry-After 1 s).
     Admission (off unless `admission_ttft_ms` is set): a request whose predicted TTFT exceeds
     it is rejected now, with a Retry-After of the excess, instead of queueing to miss its SLO.
  8. Liveness: only replicas that are healthy by their last report, reported within
     `stale_after_s`, and had no failed call since, are chosen. With no live prefill replica
     the decode replicas prefill every prompt (degraded); with no live decode replica a
     prefill replica serves whole requests (`prefill_local`, degraded); with neither, the
     request is refused as unavailable (503).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.scheduler.decode_cost import decode_cost_ms, prefill_delay_ms
from runtime.scheduler.handoff import Handoff
from runtime.scheduler.isolation import ArrivalRate, short_cost_ms
from runtime.scheduler.loads import DecodeTable, PrefillTable, ReplicaColumns, other_than
from runtime.scheduler.types import Decision, Engine, Lane, Rejection, RequestInfo

OUTPUT_FRACTION_WEIGHT = 0.05  # weight of the newest request in output_fraction


@dataclass(frozen=True)
class PolicyConfig:
    long_prompt_tokens: int = 4096
    long_prefill_ms: float | None = None
    stale_after_s: float = 1.0  # replicas report every 0.4 s
    local_max_prompt_tokens: int | None = None  # None: any prompt may be prefilled locally
    kv_bytes_per_token: int = 131072  # Llama-3-8B bf16: 2 * 32 layers * 8 heads * 128 * 2 B
    link_bytes_per_s: float = 5e9
    transfer_latency_ms: float = 0.5
    split_overhead_ms: float = 5.0  # the extra hop to a prefill replica and back (at start)
    tpot_budget_ms: float = 100.0  # local prefills may slow a decode replica's TPOT up to this
    tpot_price: float = 10.0  # first-token ms per TPOT ms: TTFT SLO / TPOT SLO (decode_cost.py)
    admission_ttft_ms: float | None = None
    disaggregation: bool = True
    # requests a decode replica may hold beyond max_num_seqs, in its engine; more get a 429
    max_queued_per_replica: int = 256
    decode_balance: bool = True  # rule 4: a prefill replica may decode what it prefilled


class GlobalScheduler:
    """Decides and books each request; the tables are updated by reports and completions."""

    def __init__(self, config: PolicyConfig, prefill: PrefillTable, decode: DecodeTable):
        self.config = config
        self.prefill = prefill
        self.decode = decode
        self.output_fraction = 0.5  # tokens generated / max_tokens, recent requests (EWMA)
        self.short_arrivals = ArrivalRate()
        self.handoff = Handoff.of(config)  # the split's hop and transfer, as measured
        self.refresh_lanes()

    def refresh_lanes(self) -> None:
        """Recompute lane membership (call after adding replicas)."""
        is_long = self.prefill.is_long
        self._lane_masks = {"long": is_long, "short": ~is_long}
        for lane, mask in self._lane_masks.items():
            if not mask.any():
                self._lane_masks[lane] = np.ones_like(mask)

    def lane_mask(self, lane: Lane) -> np.ndarray:
        """The prefill replicas that serve the lane."""
        return self._lane_masks[lane]

    def lane(self, prompt_len: int) -> Lane:
        if prompt_len >= self.config.long_prompt_tokens:
            return "long"
        if self.config.long_prefill_ms is not None and len(self.prefill.ids):
            typical_ms = float(np.median(self.prefill.work.predict_ms(prompt_len)))
            if typical_ms >= self.config.long_prefill_ms:
                return "long"
        return "short"

    def decide(self, request: RequestInfo, now_s: float,
               avoid: Engine | None = None) -> Decision | Rejection:
        """Choose lane, mode and replicas for one request, and book it. Side effect: the
        chosen replicas' counts include this request from now on. `avoid`: an engine not to
        prefill it on (a long prompt moving off an engine that is late), if another can."""
        lane = self.lane(request.prompt_len)
        if lane == "short" and avoid is None:
            self.short_arrivals.arrived(now_s)
        stale_s = self.config.stale_after_s
        d_live = self.decode.live(now_s, stale_s)
        p_live = self.prefill.live(now_s, stale_s) if self.config.disaggregation \
            else np.zeros(len(self.prefill.ids), dtype=bool)
        local_ok = np.ones(len(self.decode.ids), dtype=bool)
        if avoid is not None:
            mask = other_than(self.prefill.ids, avoid.prefill_replica)
            p_live = p_live & mask if (p_live & mask).any() else p_live
            local_ok = other_than(self.decode.ids, avoid.local_replica)
        if not d_live.any():
            if p_live.any():
                return self._prefill_local(request, lane, p_live, now_s,
                                           "degraded: no live decode replica")
            return Rejection.no_replica("no live replica in either pool")
        d_open = d_live & (self.decode.booked_seqs
                           < self.decode.max_num_seqs + self.config.max_queued_per_replica)
        if not d_open.any():
            return Rejection("overloaded: every live decode replica has max_num_seqs + "
                             f"{self.config.max_queued_per_replica} requests", 1.0)
        d_open_local = d_open & local_ok if (d_open & local_ok).any() else d_open
        if not self.config.disaggregation:
            return self._colocated(request, lane, d_open_local, now_s)
        if request.one_engine:
            return self._one_engine(request, lane, d_open_local, p_live, now_s)
        d = self.decode.place(request.prompt_len + request.max_tokens, d_open)
        if d is None:
            return Rejection.no_room(request)
        if not self._decode_pool_has_room(request, d_open) and p_live.any():
            overflow = p_live & self.prefill.room(request.prompt_len + request.max_tokens)
            if overflow.any():
                return self._prefill_local(request, lane, overflow, now_s,
                                           "decode pool full: a prefill replica serves it whole")
        n = request.prompt_len
        local_ms = self.decode.first_token_ms(n, lane, now_s)
        can_local = self.can_local(request, d_live, now_s) & local_ok
        if not p_live.any():  # degraded: the decode replicas prefill everything themselves
            pool = np.flatnonzero(can_local if can_local.any() else d_live)
            best = int(pool[np.argmin(local_ms[pool])])
            return self._book_local(request, lane, best, float(local_ms[best]), now_s,
                                    "degraded: no live prefill replica")
        work = self.prefill.work
        # a split's first token there, its decodes' steps included, and its delay to the
        # prompts outstanding there (work.delay_to_others_ms)
        p_first_ms = self.prefill.first_token_ms(n, lane, now_s)
        split_ms = p_first_ms + self.handoff.first_ms
        split_cost = split_ms + work.delay_to_others_ms(n, lane)
        in_lane = self._lane_masks[lane] & p_live
        candidates = np.flatnonzero(in_lane if in_lane.any() else p_live)
        p = int(candidates[np.argmin(split_cost[candidates])])
        split_ttft = float(split_ms[p])
        transfer_ms = self.handoff.transfer_ms(n)
        split_ready = split_ttft + transfer_ms
        local_cost = local_ms + self.decode.work.delay_to_others_ms(n, lane)
        added = self._added_ms(request, self.decode, now_s)
        local = None
        if can_local.any():
            local = self._cheapest(can_local, local_cost, added)
            # a short prompt: local if its first token is no later than the split path would
            # have the KV on a decode replica; a long one: if its first token, plus what it
            # costs the short prompts (isolation.py), is less than on the prefill pool
            limit = float(split_cost[p]) + transfer_ms
            if lane == "long":
                p_cost, d_cost = short_cost_ms(self.prefill, self.decode, p_live, d_live, n,
                                               self.short_arrivals.per_s(now_s), now_s)
                limit = float(split_cost[p] + p_cost[p] - d_cost[local])
            if local_cost[local] > limit:
                local = None
        # a split prefills on p, not on d: it delays the sequences p decodes, not d's
        of, price = self.output_fraction, self.config.tpot_price
        best_ms = float(local_cost[local] + added[local]) if local is not None \
            else float(split_cost[p] + transfer_ms + added[d] - prefill_delay_ms(
                self.decode, n, of, price)[d] + prefill_delay_ms(self.prefill, n, of, price)[p])
        whole_ms = self._whole_on_prefill_ms(request, p, float(p_first_ms[p]),
                                             float(split_cost[p] - split_ms[p]), now_s)
        # rule 4 does not trade a first token for decode time: not a long prompt's that a
        # decode replica starts sooner, nor a short one's, moving it onto a prefill replica
        # with a long prefill to run from a decode replica that has none
        if local is not None and (lane == "long" or (
                self.prefill.work.num_long[p] > 0 and self.decode.work.num_long[local] == 0)):
            whole_ms = np.inf
        if whole_ms < best_ms:
            only_p = np.arange(len(self.prefill.ids)) == p
            return self._prefill_local(
                request, lane, only_p, now_s,
                f"whole on the prefill replica: adds {whole_ms:.0f} ms < "
                f"{best_ms:.0f} ms {'local' if local is not None else 'split'}")
        if local is not None:
            delay = float(split_cost[p] - split_ms[p])  # to the prompts outstanding on p
            return self._book_local(request, lane, local, float(local_ms[local]), now_s,
                                    f"local prefill {local_ms[local]:.1f} ms; split "
                                    f"{split_ready:.1f} ms + {delay:.1f} ms to others there")
        rejection = self._admit(split_ttft)
        if rejection is not None:
            return rejection
        blocks = self.decode.blocks_for(n + request.max_tokens)
        self.decode.placed(d, blocks, request.max_tokens)
        own_ms = self.prefill.book(p, request.request_id, lane, n, now_s)
        reason = self._split_reason(request, can_local, local_ms, split_ready)
        return Decision(lane, "disaggregated", self.prefill.ids[p], self.decode.ids[d],
                        split_ttft, reason, own_ms)

    def _prefill_local(self, request: RequestInfo, lane: Lane, candidates: np.ndarray,
                       now_s: float, reason: str) -> Decision | Rejection:
        """A prefill replica serves the whole request: the decode pool is full, or down."""
        table = self.prefill
        wait_ms = table.first_token_ms(request.prompt_len, lane, now_s)
        p = self._cheapest(candidates, wait_ms, self._added_ms(request, table, now_s))
        rejection = self._admit(float(wait_ms[p]))
        if rejection is not None:
            return rejection
        table.placed(p, table.blocks_for(request.prompt_len + request.max_tokens),
                     request.max_tokens)
        own_ms = table.book(p, request.request_id, lane, request.prompt_len, now_s, own=1)
        return Decision(lane, "prefill_local", table.ids[p], "", float(wait_ms[p]), reason,
                        own_ms)

    def _whole_on_prefill_ms(self, request: RequestInfo, p: int, first_token_ms: float,
                             delay_ms: float, now_s: float) -> float:
        """What the request adds in all if prefill replica p, which prefills it anyway, decodes
        it too (rule 4: no transfer, no second hop; the prefills p runs share its steps).
        delay_ms: its prefill's cost to the long prompts waiting on p. inf: p has no room."""
        if not self.config.decode_balance or not self.prefill.room(
                request.prompt_len + request.max_tokens)[p]:
            return np.inf
        added = self._added_ms(request, self.prefill, now_s)
        return first_token_ms + delay_ms + float(added[p])

    def _decode_pool_has_room(self, request: RequestInfo, d_open: np.ndarray) -> bool:
        """A live decode replica can take the sequence now: KV blocks and a slot free, and
        its TPOT within budget (or nothing decoding there yet)."""
        table = self.decode
        tpot_ok = (table.tpot_ms <= self.config.tpot_budget_ms) | (table.booked_seqs == 0)
        return bool((d_open & table.room(request.prompt_len + request.max_tokens)
                     & tpot_ok).any())

    def output_seen(self, num_output_tokens: int, max_tokens: int) -> None:
        """A request ran to its end: how much of its max_tokens it used."""
        if max_tokens > 0:
            error = min(1.0, num_output_tokens / max_tokens) - self.output_fraction
            self.output_fraction += OUTPUT_FRACTION_WEIGHT * error

    def _added_ms(self, request: RequestInfo, table: ReplicaColumns,
                  now_s: float) -> np.ndarray:
        """Every replica's decode cost for this request (decode_cost.py)."""
        return decode_cost_ms(table, request.prompt_len, request.max_tokens,
                              self.output_fraction, self.config.tpot_price, now_s)

    @staticmethod
    def _cheapest(candidates: np.ndarray, ttft_ms: np.ndarray, added_ms: np.ndarray) -> int:
        """The candidate engine where the request costs the least in all: its predicted
        first token plus its decode cost there. A fuller batch costs every token of every
        sequence in it: requests spread unless one engine is much nearer their first token."""
        pool = np.flatnonzero(candidates)
        return int(pool[np.argmin(ttft_ms[pool] + added_ms[pool])])

    def _split_reason(self, request: RequestInfo, can_local: np.ndarray,
                      local_ms: np.ndarray, split_ready: float) -> str:
        limit = self.config.local_max_prompt_tokens
        if limit is not None and request.prompt_len > limit:
            return "prompt too long for local"
        if not can_local.any():
            return "no decode replica has room or TPOT budget for a local prefill"
        local = float(local_ms[can_local].min())
        return f"split {split_ready:.1f} ms < local {local:.1f} ms" if split_ready < local else \
            f"split {split_ready:.1f} ms, local {local:.1f} ms but costlier to short prompts"

    def can_local(self, request: RequestInfo, d_live: np.ndarray,
                   now_s: float) -> np.ndarray:
        """Live decode replicas that may prefill this prompt themselves now (room, budget)."""
        table = self.decode
        limit = self.config.local_max_prompt_tokens
        if limit is not None and request.prompt_len > limit:
            return np.zeros(len(table.ids), dtype=bool)
        blocks = table.blocks_for(request.prompt_len + request.max_tokens)
        room = (table.free_blocks >= blocks) & (table.active_seqs < table.max_num_seqs)
        short, long_ = table.work.remaining_ms(now_s)
        work_after = short + long_ + table.work.predict_ms(request.prompt_len)
        # the tokens a sequence there still decodes, on average
        tokens_left = table.tokens_left() / np.maximum(table.booked_seqs, 1)
        slack_ms = np.maximum(self.config.tpot_budget_ms - table.tpot_ms, 0.0)
        within_budget = (table.booked_seqs == 0) | (work_after <= tokens_left * slack_ms)
        return d_live & room & within_budget

    def _book_local(self, request: RequestInfo, lane: Lane, d: int, ttft_ms: float,
                    now_s: float, reason: str) -> Decision | Rejection:
        rejection = self._admit(ttft_ms)
        if rejection is not None:
            return rejection
        self.decode.placed(d, self.decode.blocks_for(request.prompt_len + request.max_tokens),
                           request.max_tokens)
        own_ms = self.decode.book(d, request.request_id, lane, request.prompt_len, now_s,
                                 own=1)
        return Decision(lane, "local", None, self.decode.ids[d], ttft_ms, reason, own_ms)

    def _admit(self, ttft_ms: float) -> Rejection | None:
        slo = self.config.admission_ttft_ms
        if slo is not None and ttft_ms > slo:
            return Rejection(f"predicted TTFT {ttft_ms:.0f} ms > SLO {slo:.0f} ms",
                             retry_after_s=(ttft_ms - slo) / 1e3)
        return None

    def _one_engine(self, request: RequestInfo, lane: Lane, d_open: np.ndarray,
                    p_live: np.ndarray, now_s: float) -> Decision | Rejection:
        """The whole request on one engine: a prefill replica (with room) when the prompt is
        long or it gives the earlier first token, else a decode replica as under colocated
        serving."""
        need = request.prompt_len + request.max_tokens
        p_room = p_live & self.prefill.room(need)
        if p_room.any():
            p_ms = self.prefill.first_token_ms(request.prompt_len, lane, now_s)
            d_ms = self.decode.first_token_ms(request.prompt_len, lane, now_s)
            d_room = d_open & self.decode.room(need)
            if lane == "long" or not d_room.any() or p_ms[p_room].min() < d_ms[d_room].min():
                return self._prefill_local(request, lane, p_room, now_s,
                                           "one engine (structured output or prompt "
                                           "logprobs): a prefill replica")
        return self._colocated(request, lane, d_open, now_s,
                               "one engine (structured output or prompt logprobs)")

    def _colocated(self, request: RequestInfo, lane: Lane, d_live: np.ndarray,
                   now_s: float, why: str = "colocated") -> Decision | Rejection:
        table = self.decode
        blocks = table.blocks_for(request.prompt_len + request.max_tokens)
        fits = d_live & (table.total_blocks >= blocks)
        if not fits.any():
            return Rejection.no_room(request)
        room = fits & (table.free_blocks >= blocks) & (table.active_seqs < table.max_num_seqs)
        wait_ms = self.decode.first_token_ms(request.prompt_len, lane, now_s)
        d = self._cheapest(room if room.any() else fits, wait_ms,
                           self._added_ms(request, table, now_s))
        s0, s1 = (float(v[d]) for v in table.decode_step())
        return self._book_local(request, lane, d, float(wait_ms[d]), now_s,
                                f"{why}: least cost (first token {wait_ms[d]:.0f} ms "
                                f"predicted, {table.booked_seqs[d]} sequences, step "
                                f"{s0:.1f} + {s1:.2f}/sequence ms)")

    def first_token(self, decision: Decision, request_id: str,
                    now_s: float | None = None) -> bool | None:
        """The request's prefill is done (its first token exists, or it ended before): its
        work leaves the engine's books. Returns whether it ran alone there (a clean sample
        for the model), None if it was not booked (any more)."""
        return self.table_of(decision).work.finished(request_id, now_s)

    def table_of(self, decision: Decision) -> PrefillTable | DecodeTable:
        """The table of the engine that prefills the decided request."""
        return self.decode if decision.mode == "local" else self.prefill

    def replica_failed(self, role: str, replica_id: str, now_s: float) -> None:
        """A call to the replica failed as a replica would (it died, its engine died)."""
        table = self.prefill if role == "prefill" else self.decode
        i = table.index.get(replica_id)
        if i is not None:
            table.mark_failed(i, now_s)

    def learn(self, decision: Decision, num_tokens: int, compute_ms: float,
              alone: bool) -> None:
        """A prefill time measured on the engine that ran the prompt, less the decode steps it
        shared (modeled apart): every one tracks the engine's slowdown under load; one that
        ran alone is a sample for its model, refitted at the replica's next report."""
        table: ReplicaColumns = self.table_of(decision)
        i = table.index.get(decision.decode_replica if decision.mode == "local"
                            else decision.prefill_replica or "")
        own = int(decision.mode != "disaggregated")  # a split decodes on another replica
        if i is None or (ms := table.prefill_alone_ms(i, num_tokens, compute_ms, own)) <= 0:
            return
        if alone:
            table.work.add_sample(i, num_tokens, ms)  # fitted at its next report
        table.work.observe(i, num_tokens, ms)

