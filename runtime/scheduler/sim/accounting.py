"""Cost per simulated request, through the live runtime's StepLedger (runtime/cost.py).

One `ReplicaBook` per simulated replica, told what the replica's CostTracker learns live:
  1. every step: its duration, the prompt tokens it computed for each prefilling request, and
     (the book knows them) the requests decoding in it; `StepLedger.record_step` divides it;
  2. a request starts decoding (`join`) and leaves the replica (`leave`): its share so far,
     priced at the replica's pool's cost per replica-hour, as `CostTracker.end` does;
  3. at the end, `usage`: busy against the run's wall time, idle capacity apart.
KV block-seconds: prompts being computed hold their tokens' whole blocks, step by step, and a
handed-off prompt holds its whole blocks on both sides from the prefill's end until the decode
batch takes it in (the lease, as `runtime.pipeline.handoff_cost` counts it). A decoding
sequence's blocks are counted as its KV token-seconds / BLOCK_SIZE (at most a block less than
whole blocks): running sums keep each decode step O(1) per replica instead of O(batch).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.cost import EngineUsage, Phase, RequestCost, StepLedger, dollars

BLOCK_SIZE = 16


def num_blocks(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_SIZE)


@dataclass(frozen=True)
class ReplicaUsage:
    """One simulated replica over the run."""

    name: str  # p0.. prefill, d0.. decode, c0.. colocated
    usage: EngineUsage
    cost_per_replica_hour: float

    @property
    def idle_dollars(self) -> float:
        """Idle and unattributed time at the replica's price: nobody's cost."""
        return dollars(self.usage.idle_s + self.usage.unattributed_s, self.cost_per_replica_hour)


class ReplicaBook:
    """One simulated replica's StepLedger. Called from the simulator's event loop only."""

    def __init__(self, name: str, cost_per_replica_hour: float) -> None:
        assert cost_per_replica_hour >= 0, "a price is never negative"
        self.name = name
        self.cost_per_replica_hour = cost_per_replica_hour
        self.ledger = StepLedger()
        self._num_steps = 0
        self._sum_s = 0.0  # sum of step durations
        self._sum_step_s = 0.0  # sum of step index x duration
        # decoding: request -> (KV tokens in step 0's terms, _sum_s, _sum_step_s at its join)
        self._decoding: dict[str, tuple[int, float, float]] = {}

    def step(self, duration_s: float, prefill_tokens: dict[str, int],
             prefill_blocks: dict[str, int]) -> None:
        """A step of duration_s computing prefill_tokens and one token of every joined
        request; prefill_blocks: the blocks each started prompt holds during it."""
        self.ledger.record_step(duration_s, prefill_tokens, self._decoding.keys())
        if prefill_blocks:
            self.ledger.hold_blocks(duration_s, prefill_blocks, "prefill")
        self._sum_s += duration_s
        self._sum_step_s += self._num_steps * duration_s
        self._num_steps += 1

    def join(self, request_id: str, num_kv_tokens: int) -> None:
        """The request decodes from the next step on, holding num_kv_tokens then and one more
        each step after."""
        assert request_id not in self._decoding, f"{request_id} joined twice"
        self._decoding[request_id] = (num_kv_tokens - self._num_steps, self._sum_s,
                                      self._sum_step_s)

    def hold(self, request_id: str, blocks: int, interval_s: float, phase: Phase) -> None:
        self.ledger.hold_blocks(interval_s, {request_id: blocks}, phase)

    def leave(self, request_id: str) -> RequestCost:
        """The request is done on this replica: its cost here, priced."""
        joined = self._decoding.pop(request_id, None)
        if joined is not None:
            base, sum_s, sum_step_s = joined
            token_s = base * (self._sum_s - sum_s) + (self._sum_step_s - sum_step_s)
            # one block for token_s / BLOCK_SIZE seconds: the same block-seconds
            self.ledger.hold_blocks(token_s / BLOCK_SIZE, {request_id: 1}, "decode")
        return self.ledger.close(request_id).priced(self.cost_per_replica_hour)

    def usage(self, wall_s: float) -> ReplicaUsage:
        """Busy against wall_s (the run's span); every request must have left."""
        assert self.ledger.num_open == 0 and not self._decoding, \
            f"{self.name}: {self.ledger.num_open} requests never left"
        assert self.ledger.busy_s <= wall_s * (1 + 1e-9), "busy beyond the run's span"
        return ReplicaUsage(self.name, EngineUsage(self.ledger.busy_s, wall_s,
                                                   self.ledger.attributed_s),
                            self.cost_per_replica_hour)
