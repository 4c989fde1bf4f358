"""What the scheduler knows about every replica, as numpy columns (one row per replica).

Reports arrive from replicas now and then; between reports the scheduler counts what it has
dispatched itself, so a burst of requests does not all pick the same "idle" replica. A report
older than `stale_after_s` is not trusted: the replica's load is then the scheduler's own
count of what it sent there and has not seen finish.
"""

from __future__ import annotations

import numpy as np

from runtime.scheduler.types import DecodeLoad, Lane, PrefillLoad

EWMA_WEIGHT = 0.2  # weight of the newest throughput sample
# Shorter prefills measure the fixed per-request overhead more than the throughput.
MIN_SAMPLE_TOKENS = 256


class PrefillTable:
    def __init__(self, replica_ids: list[str], lanes: list[Lane], default_tokens_per_s: float):
        assert len(replica_ids) == len(lanes), "one lane per replica"
        self.default_tokens_per_s = default_tokens_per_s
        self.ids = list(replica_ids)
        self.index = {rid: i for i, rid in enumerate(self.ids)}
        n = len(self.ids)
        self.is_long = np.array([lane == "long" for lane in lanes], dtype=bool)
        self.reported_pending = np.zeros(n)
        self.sent_since_report = np.zeros(n)  # tokens dispatched after the last report
        self.outstanding = np.zeros(n)  # tokens dispatched and not yet seen finished
        self.tokens_per_s = np.full(n, float(default_tokens_per_s))
        self.reported_at = np.full(n, -np.inf)

    def add(self, replica_id: str, lane: Lane) -> int:
        """A replica seen for the first time (replicas come and go with autoscaling)."""
        self.ids.append(replica_id)
        self.index[replica_id] = len(self.ids) - 1
        self.is_long = np.append(self.is_long, lane == "long")
        for name, value in (("reported_pending", 0.0), ("sent_since_report", 0.0),
                            ("outstanding", 0.0),
                            ("tokens_per_s", float(np.median(self.tokens_per_s))
                                              if len(self.ids) > 1
                                              else self.default_tokens_per_s),
                            ("reported_at", -np.inf)):
            setattr(self, name, np.append(getattr(self, name), value))
        return self.index[replica_id]

    def report(self, load: PrefillLoad) -> None:
        i = self.index[load.replica_id]
        self.reported_pending[i] = load.num_pending_tokens
        self.sent_since_report[i] = 0.0
        self.reported_at[i] = load.reported_at_s
        if load.tokens_per_s > 0:
            self.tokens_per_s[i] = load.tokens_per_s

    def dispatched(self, i: int, num_tokens: int) -> None:
        self.sent_since_report[i] += num_tokens
        self.outstanding[i] += num_tokens

    def finished(self, replica_id: str, num_tokens: int, elapsed_s: float) -> None:
        """A prefill of num_tokens took elapsed_s of compute on this replica."""
        i = self.index[replica_id]
        self.outstanding[i] = max(0.0, self.outstanding[i] - num_tokens)
        if elapsed_s > 0 and num_tokens >= MIN_SAMPLE_TOKENS:
            sample = num_tokens / elapsed_s
            self.tokens_per_s[i] += EWMA_WEIGHT * (sample - self.tokens_per_s[i])

    def predicted_wait_s(self, now_s: float, stale_after_s: float) -> np.ndarray:
        fresh = (now_s - self.reported_at) <= stale_after_s
        pending = np.where(fresh, self.reported_pending + self.sent_since_report,
                           self.outstanding)
        return pending / self.tokens_per_s


class DecodeTable:
    def __init__(self, replica_ids: list[str], num_total_blocks: list[int], block_size: int,
                 max_num_seqs: int, default_tokens_per_s: float):
        self.default_tokens_per_s = default_tokens_per_s
        self.default_max_num_seqs = max_num_seqs
        self.ids = list(replica_ids)
        self.index = {rid: i for i, rid in enumerate(self.ids)}
        n = len(self.ids)
        self.block_size = block_size
        self.total_blocks = np.array(num_total_blocks, dtype=np.int64)
        self.free_blocks = self.total_blocks.copy()
        self.active_seqs = np.zeros(n, dtype=np.int64)
        self.max_num_seqs = np.full(n, max_num_seqs, dtype=np.int64)
        self.prefill_tokens_per_s = np.full(n, float(default_tokens_per_s))
        self.prefill_measured = np.zeros(n, dtype=bool)
        self.local_pending = np.zeros(n)  # prompt tokens this replica prefills itself
        self.reported_at = np.full(n, -np.inf)

    def add(self, replica_id: str, num_total_blocks: int) -> int:
        self.ids.append(replica_id)
        self.index[replica_id] = len(self.ids) - 1
        self.total_blocks = np.append(self.total_blocks, num_total_blocks)
        self.free_blocks = np.append(self.free_blocks, num_total_blocks)
        self.active_seqs = np.append(self.active_seqs, 0)
        self.max_num_seqs = np.append(self.max_num_seqs, self.default_max_num_seqs)
        self.prefill_tokens_per_s = np.append(self.prefill_tokens_per_s,
                                              self.default_tokens_per_s)
        self.local_pending = np.append(self.local_pending, 0.0)
        self.prefill_measured = np.append(self.prefill_measured, False)
        self.reported_at = np.append(self.reported_at, -np.inf)
        return self.index[replica_id]

    def report(self, load: DecodeLoad) -> None:
        i = self.index[load.replica_id]
        self.free_blocks[i] = load.num_free_blocks
        self.active_seqs[i] = load.num_active_seqs
        self.max_num_seqs[i] = load.max_num_seqs
        self.reported_at[i] = load.reported_at_s
        if load.prefill_tokens_per_s > 0:
            self.prefill_tokens_per_s[i] = load.prefill_tokens_per_s
            self.prefill_measured[i] = True

    def local_prefill_finished(self, i: int, num_tokens: int, elapsed_s: float) -> None:
        self.local_pending[i] = max(0.0, self.local_pending[i] - num_tokens)
        if elapsed_s > 0 and num_tokens >= MIN_SAMPLE_TOKENS:
            sample = num_tokens / elapsed_s
            if not self.prefill_measured[i]:
                self.prefill_tokens_per_s[i] = sample
                self.prefill_measured[i] = True
            else:
                self.prefill_tokens_per_s[i] += EWMA_WEIGHT * (sample
                                                               - self.prefill_tokens_per_s[i])

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def placed(self, i: int, num_blocks: int, local_prompt_tokens: int) -> None:
        self.free_blocks[i] -= num_blocks
        self.active_seqs[i] += 1
        self.local_pending[i] += local_prompt_tokens

    def released(self, replica_id: str, num_blocks: int, local_prompt_tokens: int = 0) -> None:
        i = self.index[replica_id]
        self.free_blocks[i] = min(self.total_blocks[i], self.free_blocks[i] + num_blocks)
        self.active_seqs[i] = max(0, self.active_seqs[i] - 1)
        self.local_pending[i] = max(0.0, self.local_pending[i] - local_prompt_tokens)
