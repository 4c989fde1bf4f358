"""What the scheduler knows about every replica, as numpy columns (one row per replica).

Replicas report their load a few times a second (what the engine holds, for KV room and
liveness). What the scheduler sent them and what it costs, it books itself as it dispatches
(`work`: predicted prefill time per request from each replica's own quadratic model; `placed`:
the sequences it decodes), so a burst of requests does not all pick the same "idle" replica
between two reports. Both pools decode: decode replicas always, prefill replicas for whole
requests when the decode pool is full or down (`prefill_local`).
"""

from __future__ import annotations

import numpy as np

from runtime.scheduler.prefill_model import PrefillModel
from runtime.scheduler.types import DecodeLoad, Lane, PrefillLoad
from runtime.scheduler.work import PrefillWork

TPOT_EWMA_WEIGHT = 0.1  # weight of the newest request's TPOT


class ReplicaColumns:
    """Liveness, KV room and the sequences a replica decodes.

    Live: healthy by its last report, that report recent, and no call to it failed since. A
    replica that never reported (tables built by hand, as in the simulator) is taken to be
    live."""

    def __init__(self, block_size: int, max_num_seqs: int, prior: PrefillModel,
                 chunk_tokens: int, step_tokens: int) -> None:
        self.block_size = block_size
        self.default_max_num_seqs = max_num_seqs
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.reported_at = np.zeros(0)
        self.healthy = np.zeros(0, dtype=bool)
        self.failed_at = np.zeros(0)
        self.total_blocks = np.zeros(0, dtype=np.int64)
        self.free_blocks = np.zeros(0, dtype=np.int64)
        self.active_seqs = np.zeros(0, dtype=np.int64)
        self.max_num_seqs = np.zeros(0, dtype=np.int64)
        self.booked_seqs = np.zeros(0, dtype=np.int64)  # sequences we placed, not yet done
        self.booked_max_tokens = np.zeros(0)  # their max_tokens, summed
        self.decoded_tokens = np.zeros(0)  # the tokens they generated so far, summed
        self.inverse_max_tokens = np.zeros(0)  # 1 / max_tokens, summed over them
        self.fraction_decoded = np.zeros(0)  # generated / max_tokens, summed over them
        self.tpot_ms = np.zeros(0)  # recent TPOT of its requests (EWMA; 0: none yet)
        # its engine's decode step, s0 + s1 * sequences ms, as it reports (nan: not yet)
        self.step_s0_ms = np.zeros(0)
        self.step_s1_ms = np.zeros(0)
        self._steps: tuple[np.ndarray, np.ndarray] | None = None  # decode_step(), until a report
        self.work = PrefillWork(prior, chunk_tokens, step_tokens)

    def _add(self, replica_id: str, num_total_blocks: int) -> int:
        self.ids.append(replica_id)
        self.index[replica_id] = len(self.ids) - 1
        for name, value in (("reported_at", -np.inf), ("healthy", True), ("failed_at", -np.inf),
                            ("total_blocks", num_total_blocks),
                            ("free_blocks", num_total_blocks), ("active_seqs", 0),
                            ("max_num_seqs", self.default_max_num_seqs), ("booked_seqs", 0),
                            ("booked_max_tokens", 0.0), ("decoded_tokens", 0.0),
                            ("inverse_max_tokens", 0.0), ("fraction_decoded", 0.0),
                            ("tpot_ms", 0.0),
                            ("step_s0_ms", np.nan), ("step_s1_ms", np.nan)):
            setattr(self, name, np.append(getattr(self, name), value))
        self._steps = None
        self.work.add_replica()
        return self.index[replica_id]

    def _report_slots(self, i: int, num_total_blocks: int, num_free_blocks: int,
                      num_active_seqs: int, max_num_seqs: int, reported_at_s: float,
                      healthy: bool) -> None:
        if num_total_blocks > 0:
            self.total_blocks[i] = num_total_blocks
            self.free_blocks[i] = num_free_blocks
            self.active_seqs[i] = num_active_seqs
            self.max_num_seqs[i] = max_num_seqs
        self.reported_at[i] = reported_at_s
        self.healthy[i] = healthy

    def report_decode_step(self, i: int, coefficients: tuple[float, ...]) -> None:
        if len(coefficients) == 2 and (self.step_s0_ms[i], self.step_s1_ms[i]) != coefficients:
            self.step_s0_ms[i], self.step_s1_ms[i] = coefficients
            self._steps = None

    def decode_step(self) -> tuple[np.ndarray, np.ndarray]:
        """Every replica's decode step, s0 and s1 ms (step_model.py): as it reported; before
        it has, the median of those that have (the same engines, as a rule); before any has,
        its prefill model's per-request and per-token cost (a step of B sequences computes B
        tokens). Kept from one report to the next: several decisions a request use it, and a
        median of a few numbers costs numpy tens of microseconds."""
        fitted = np.isfinite(self.step_s0_ms)
        if not fitted.any():
            return self.work.a.copy(), self.work.b.copy()  # the prior refits as prefills end
        if self._steps is None:
            prior0 = float(np.median(self.step_s0_ms[fitted]))
            prior1 = float(np.median(self.step_s1_ms[fitted]))
            self._steps = (np.where(fitted, self.step_s0_ms, prior0),
                           np.where(fitted, self.step_s1_ms, prior1))
        return self._steps

    def first_token_ms(self, num_tokens: int, lane: Lane, now_s: float) -> np.ndarray:
        """Every replica's predicted first token for a prompt it prefills itself: its prefill
        work (work.wait_ms) and the steps of the sequences it decodes meanwhile."""
        return self.work.wait_ms(now_s, num_tokens, lane) + self.decode_steps_ms(num_tokens)

    def decode_steps_ms(self, num_tokens: int, own: int = 0) -> np.ndarray:
        """Every replica's time for the steps of the sequences it decodes while it prefills
        a prompt of num_tokens: their step (s0 + s1 x sequences, the engine's own step
        model) in every step the prompt takes. With sequences decoding there, vLLM gives a
        prompt longer than chunk_tokens at most that many tokens a step
        (long_prefill_token_threshold). own: booked sequences that are the prompt's own
        (they decode after it)."""
        chunk, step = self.work.chunk_tokens, max(1, self.work.step_tokens)
        steps = np.ceil(num_tokens / (min(chunk, step) if 0 < chunk < num_tokens else step))
        seqs = np.maximum(self.booked_seqs - own, 0)
        s0, s1 = self.decode_step()
        return steps * np.where(seqs > 0, s0 + s1 * seqs, 0.0)

    def book(self, i: int, request_id: str, lane: Lane, num_tokens: int, now_s: float,
             own: int = 0) -> float:
        """Book a prefill on replica i (work.book) with the decode steps it shares there
        (decode_steps_ms): the prompts held behind it wait for those too. Returns its
        predicted time. own: 1 if the request decodes there after."""
        shared_ms = float(self.decode_steps_ms(num_tokens, own)[i])
        return self.work.book(i, request_id, lane, num_tokens, now_s, shared_ms)

    def prefill_alone_ms(self, i: int, num_tokens: int, measured_ms: float, own: int) -> float:
        """A prefill measured on replica i, less the decode steps it shared (decode_steps_ms,
        modeled apart): what its prefill model and slowdown learn from."""
        return measured_ms - float(self.decode_steps_ms(num_tokens, own)[i])

    def mark_failed(self, i: int, now_s: float) -> None:
        """A call to replica i failed as a replica (died, engine dead): out until it reports
        again."""
        self.failed_at[i] = now_s

    def live(self, now_s: float, stale_after_s: float) -> np.ndarray:
        reported = np.isfinite(self.reported_at)
        fresh = ~reported | (now_s - self.reported_at <= stale_after_s)
        failed_since = np.isfinite(self.failed_at) & (self.failed_at >= self.reported_at)
        return self.healthy & fresh & ~failed_since

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def room(self, num_tokens: int) -> np.ndarray:
        """Replicas with the KV blocks free now and a sequence slot."""
        return (self.free_blocks >= self.blocks_for(num_tokens)) \
            & (self.active_seqs < self.max_num_seqs)

    def placed(self, i: int, num_blocks: int, max_tokens: int) -> None:
        self.free_blocks[i] -= num_blocks
        self.active_seqs[i] += 1
        self.booked_seqs[i] += 1
        self.booked_max_tokens[i] += max_tokens
        self.inverse_max_tokens[i] += 1.0 / max(1, max_tokens)

    def progressed(self, replica_id: str, num_tokens: int, fraction: float) -> None:
        """Sequences placed on the replica generated num_tokens more; fraction: each one's
        new tokens over its max_tokens, summed (num_tokens / max_tokens for one)."""
        i = self.index.get(replica_id)
        if i is not None:
            self.decoded_tokens[i] += num_tokens
            self.fraction_decoded[i] += fraction

    def tokens_left(self) -> np.ndarray:
        """Every replica's tokens still to generate by the sequences placed there, at most:
        their max_tokens less what they generated (progressed)."""
        return np.maximum(self.booked_max_tokens - self.decoded_tokens, 0.0)

    def sequences_left(self) -> np.ndarray:
        """Every replica's sequences, each counted by the share of its max_tokens it has not
        generated yet: what a delay to every token they still decode adds to their TPOTs,
        in units of that delay spread over one sequence's own tokens."""
        return np.maximum(self.booked_seqs - self.fraction_decoded, 0.0)

    def released(self, replica_id: str, num_blocks: int, max_tokens: int,
                 tpot_ms: float = 0.0, num_generated: int = 0) -> None:
        """A sequence placed on the replica left (num_generated: its tokens reported by
        progressed)."""
        i = self.index[replica_id]
        self.free_blocks[i] = min(self.total_blocks[i], self.free_blocks[i] + num_blocks)
        self.active_seqs[i] = max(0, self.active_seqs[i] - 1)
        self.booked_seqs[i] = max(0, self.booked_seqs[i] - 1)
        self.booked_max_tokens[i] = max(0.0, self.booked_max_tokens[i] - max_tokens)
        self.decoded_tokens[i] = max(0.0, self.decoded_tokens[i] - num_generated)
        self.inverse_max_tokens[i] -= 1.0 / max(1, max_tokens)
        self.fraction_decoded[i] -= num_generated / max(1, max_tokens)
        if self.booked_seqs[i] == 0:  # no float drift left behind
            self.inverse_max_tokens[i] = self.fraction_decoded[i] = 0.0
        if tpot_ms > 0:
            old = self.tpot_ms[i]
            self.tpot_ms[i] = tpot_ms if old == 0 else old + TPOT_EWMA_WEIGHT * (tpot_ms - old)


class PrefillTable(ReplicaColumns):
    def __init__(self, replica_ids: list[str], lanes: list[Lane], prior: PrefillModel,
                 chunk_tokens: int = 512, step_tokens: int = 2048, block_size: int = 16,
                 max_num_seqs: int = 64):
        assert len(replica_ids) == len(lanes), "one lane per replica"
        super().__init__(block_size, max_num_seqs, prior, chunk_tokens, step_tokens)
        self.is_long = np.zeros(0, dtype=bool)
        self.reported_pending = np.zeros(0)
        for replica_id, lane in zip(replica_ids, lanes, strict=True):
            self.add(replica_id, lane)

    def add(self, replica_id: str, lane: Lane, num_total_blocks: int = 0) -> int:
        """A replica seen for the first time (replicas come and go with autoscaling). Until
        it reports its KV cache (num_total_blocks 0), it serves no whole request."""
        self.is_long = np.append(self.is_long, lane == "long")
        self.reported_pending = np.append(self.reported_pending, 0.0)
        return self._add(replica_id, num_total_blocks)

    def report(self, load: PrefillLoad) -> None:
        i = self.index[load.replica_id]
        self.reported_pending[i] = load.num_pending_tokens
        self._report_slots(i, load.num_total_blocks, load.num_free_blocks,
                           load.num_active_seqs, load.max_num_seqs, load.reported_at_s,
                           load.healthy)


class DecodeTable(ReplicaColumns):
    def __init__(self, replica_ids: list[str], num_total_blocks: list[int], block_size: int,
                 max_num_seqs: int, prior: PrefillModel, chunk_tokens: int = 512,
                 step_tokens: int = 2048):
        super().__init__(block_size, max_num_seqs, prior, chunk_tokens, step_tokens)
        for replica_id, blocks in zip(replica_ids, num_total_blocks, strict=True):
            self.add(replica_id, blocks)

    def add(self, replica_id: str, num_total_blocks: int) -> int:
        return self._add(replica_id, num_total_blocks)

    def place(self, num_tokens: int, live: np.ndarray) -> int | None:
        """The live replica to decode a sequence of num_tokens (prompt + max_tokens): among
        those that can hold it at all, those with the blocks and a slot free now first, then
        fewest active sequences, then most free blocks; None if none can hold it."""
        blocks = self.blocks_for(num_tokens)
        can_fit = live & (self.total_blocks >= blocks)
        if not can_fit.any():
            return None
        room_now = can_fit & (self.free_blocks >= blocks) & (self.active_seqs
                                                            < self.max_num_seqs)
        candidates = np.flatnonzero(room_now if room_now.any() else can_fit)
        score = self.active_seqs[candidates] * (self.total_blocks.max() + 1) \
            - self.free_blocks[candidates]
        return int(candidates[np.argmin(score)])

    def report(self, load: DecodeLoad) -> None:
        i = self.index[load.replica_id]
        self._report_slots(i, max(1, int(self.total_blocks[i])), load.num_free_blocks,
                           load.num_active_seqs, load.max_num_seqs, load.reported_at_s,
                           load.healthy)


def other_than(ids: list[str], replica_id: str | None) -> np.ndarray:
    """A mask of the replicas other than replica_id (all of them for None)."""
    return np.array([rid != replica_id for rid in ids], dtype=bool)
