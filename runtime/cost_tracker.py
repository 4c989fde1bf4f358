"""Which of a replica's requests took part in each engine step, for the StepLedger.

vLLM's public stat-logger hook tells, per step, how long the step ran and how many prompt
tokens and decoding sequences it scheduled (`SchedulerIterationDetails`), not for which
requests. The replica tells this tracker which requests it submitted, in order, and when it
saw each one's first token; the tracker assigns each step's counts to them the way vLLM's
scheduler fills a step:
  1. prompt tokens go to the oldest prefilling requests first (running chunked prefills are
     scheduled before waiting ones), each up to the prompt tokens it still has to compute;
     a request whose prompt is done decodes from the next step on; a request whose KV comes
     from another engine takes no prompt tokens (its one computed token is not worth a guess);
  2. decode slots go to the oldest decoding requests;
  3. what no known request can take (a calibration prompt, an estimate that fell short) is
     busy time left unattributed (EngineUsage), not charged to anyone.
Seeing a request's first token corrects the estimate (a prefix-cache hit computes fewer
tokens than the prompt has). Blocks held: the request's tokens so far in whole blocks, from
the first step it took part in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from runtime.cost import EngineUsage, Phase, RequestCost, StepLedger


@dataclass(frozen=True)
class StepCounts:
    """One engine step as vLLM reports it."""

    duration_s: float
    num_prefill_requests: int
    num_prefill_tokens: int
    num_decode_requests: int


@dataclass
class _InFlight:
    num_prompt_tokens: int
    num_prefill_left: int  # prompt tokens the engine has still to compute (an estimate)
    decoding: bool = False  # (neither: its KV is loading from another engine)
    num_decoded: int = 0
    held_until_s: float | None = None  # blocks booked up to here; None: none held yet

    @property
    def num_kv_tokens(self) -> int:
        return self.num_prompt_tokens - self.num_prefill_left + self.num_decoded


class CostTracker:
    """One engine's per-request cost. The replica calls begin / first_token / end around
    each generation; vLLM's stat logger calls on_step after every step. One thread (the
    replica's event loop) calls all of them."""

    def __init__(self, block_size: int, cost_per_replica_hour: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert block_size >= 1 and cost_per_replica_hour >= 0
        self.block_size = block_size
        self.cost_per_replica_hour = cost_per_replica_hour
        self.ledger = StepLedger()
        self._clock = clock
        self._started_s = clock()
        self._requests: dict[str, _InFlight] = {}  # in submission order

    def begin(self, request_id: str, num_prompt_tokens: int, loads_kv: bool = False) -> None:
        """A request goes to the engine. loads_kv: its prompt's KV comes from another engine;
        it holds blocks from now, and takes no step's prompt tokens (vLLM schedules it only
        once its KV is in, for its last token) until its first token is seen."""
        request = _InFlight(num_prompt_tokens, 0 if loads_kv else num_prompt_tokens)
        if loads_kv:
            request.held_until_s = self._clock()
        self._requests[request_id] = request

    def first_token(self, request_id: str) -> None:
        """The replica saw the request's first token: its prompt is done."""
        request = self._requests.get(request_id)
        if request is not None:
            request.num_prefill_left = 0
            request.decoding = True

    def end(self, request_id: str) -> RequestCost:
        """The request is finished or gone: its cost, priced at this pool's rate."""
        self._requests.pop(request_id, None)
        return self.ledger.close(request_id).priced(self.cost_per_replica_hour)

    def usage(self) -> EngineUsage:
        return EngineUsage(self.ledger.busy_s, self._clock() - self._started_s,
                           self.ledger.attributed_s)

    def restart_clock(self) -> None:
        """Count wall time from now (the engine is up; its start-up is not idle capacity)."""
        self._started_s = self._clock()

    def on_step(self, step: StepCounts) -> None:
        now = self._clock()
        prefilling = [(rid, r) for rid, r in self._requests.items() if r.num_prefill_left > 0]
        decoding = [rid for rid, r in self._requests.items() if r.decoding]
        tokens = self._assign_prompt_tokens(prefilling[:step.num_prefill_requests],
                                            step.num_prefill_tokens)
        decoded = decoding[:step.num_decode_requests]
        num_other = (step.num_prefill_tokens - sum(tokens.values())
                     + step.num_decode_requests - len(decoded))
        self.ledger.record_step(step.duration_s, tokens, decoded, num_other)
        for request_id in decoded:
            self._requests[request_id].num_decoded += 1
        for request_id, n in tokens.items():
            request = self._requests[request_id]
            request.num_prefill_left = max(0, request.num_prefill_left - n)
        self._hold_blocks(now, step.duration_s, set(tokens), set(decoded))
        for request_id in tokens:
            request = self._requests[request_id]
            request.decoding = request.decoding or request.num_prefill_left == 0

    @staticmethod
    def _assign_prompt_tokens(candidates: list[tuple[str, _InFlight]],
                              num_tokens: int) -> dict[str, int]:
        """Oldest first, each up to what it has left (what is left over was some other
        request's: unattributed)."""
        tokens: dict[str, int] = {}
        left = num_tokens
        for request_id, request in candidates:
            n = min(request.num_prefill_left, left)
            if n > 0:
                tokens[request_id] = n
                left -= n
        return tokens

    def _hold_blocks(self, now: float, duration_s: float, prefilled: set[str],
                     decoded: set[str]) -> None:
        """Every request that has taken part in a step (or is loading its KV) holds its
        tokens' blocks until it ends: prefill-side while its prompt is computed, decode-side
        after."""
        for request_id, request in self._requests.items():
            if request.held_until_s is None:
                if request_id not in prefilled and request_id not in decoded:
                    continue
                request.held_until_s = now - duration_s
            num_blocks = math.ceil(request.num_kv_tokens / self.block_size)
            phase: Phase = ("prefill" if request_id in prefilled or request.num_prefill_left
                            else "decode")
            self.ledger.hold_blocks(now - request.held_until_s, {request_id: num_blocks}, phase)
            request.held_until_s = now
