"""Which of a replica's requests took part in each engine step, for the StepLedger.

vLLM's public stat-logger hook tells, per step, how long the step ran and how many prompt
tokens and decoding sequences it scheduled (`SchedulerIterationDetails`), not for which
requests. The replica tells this tracker which requests it submitted, in order, and when it
saw each one's first token; the tracker assigns each step's counts to them the way vLLM's
scheduler fills a step:
  1. the step's prompt tokens go to as many prefilling requests as vLLM says it scheduled:
     those already started first (vLLM schedules running requests before waiting ones), then
     the waiting ones in arrival order (by priority first, under the priority policy); they
     share the tokens evenly, each up to what it still has to compute, the surplus of a short
     one going to the others (vLLM caps every prefill at the same long_prefill_token_threshold
     per step, so an even split reproduces its chunks); a request whose prompt is done decodes
     from the next step on; a request whose KV comes from another engine takes no prompt
     tokens (its one computed token is not worth a guess);
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
from runtime.scheduler.step_model import DecodeStepFit

# a longer gap between two steps' outputs is the engine idle (or stalled), not a step
MAX_STEP_PERIOD_S = 1.0


@dataclass(frozen=True)
class StepCounts:
    """One engine step as vLLM reports it. duration_s None: the engine did not time the step
    (with the model in the engine core process, vLLM's elapsed_ms covers only the sampling);
    the tracker then takes the step's period as the replica saw it."""

    duration_s: float | None
    num_prefill_requests: int
    num_prefill_tokens: int
    num_decode_requests: int


@dataclass
class _InFlight:
    num_prompt_tokens: int
    num_prefill_left: int  # prompt tokens the engine has still to compute (an estimate)
    arrival: tuple[int, int]  # (priority, submission) order in vLLM's waiting queue
    started: int | None = None  # order in vLLM's running queue, once it got prompt tokens
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
                 clock: Callable[[], float] = time.monotonic, by_priority: bool = False) -> None:
        """by_priority: the engine runs vLLM's priority policy (else first come first served)."""
        assert block_size >= 1 and cost_per_replica_hour >= 0
        self.block_size = block_size
        self.cost_per_replica_hour = cost_per_replica_hour
        self.by_priority = by_priority
        self._num_begun = 0
        self._num_started = 0
        self.ledger = StepLedger()
        self._clock = clock
        self._started_s = clock()
        self._requests: dict[str, _InFlight] = {}  # in submission order
        self.decode_steps = DecodeStepFit()  # the engine's step time by batch size
        self._last_step_s: float | None = None  # when the last step's output came
        self._busy_from_s = self._started_s  # the later of the last output and idle's end

    def begin(self, request_id: str, num_prompt_tokens: int, loads_kv: bool = False,
              priority: int = 0) -> None:
        """A request goes to the engine. loads_kv: its prompt's KV comes from another engine;
        it holds blocks from now, and takes no step's prompt tokens (vLLM schedules it only
        once its KV is in, for its last token) until its first token is seen."""
        self._num_begun += 1
        if not self._requests:
            self._last_step_s = None  # the engine was idle: no step period until the next
            self._busy_from_s = self._clock()
        arrival = (priority if self.by_priority else 0, self._num_begun)
        request = _InFlight(num_prompt_tokens, 0 if loads_kv else num_prompt_tokens, arrival)
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
        if not self._requests:
            self._last_step_s = None
        return self.ledger.close(request_id).priced(self.cost_per_replica_hour)

    def usage(self) -> EngineUsage:
        return EngineUsage(self.ledger.busy_s, self._clock() - self._started_s,
                           self.ledger.attributed_s)

    def restart_clock(self) -> None:
        """Count wall time from now (the engine is up; its start-up is not idle capacity)."""
        self._started_s = self._busy_from_s = self._clock()

    def on_step(self, step: StepCounts) -> None:
        now = self._clock()
        if step.num_prefill_tokens == 0 and self._last_step_s is not None \
                and now - self._last_step_s <= MAX_STEP_PERIOD_S:
            # sequences were decoding since the last step: the engine ran one step after
            # another, and this one's period is what a token took
            self.decode_steps.add(step.num_decode_requests, 1e3 * (now - self._last_step_s))
        self._last_step_s = now
        duration_s = step.duration_s
        if duration_s is None:  # since the last output, or since work came to an idle engine
            duration_s = min(max(0.0, now - self._busy_from_s), MAX_STEP_PERIOD_S)
        self._busy_from_s = now
        prefilling = [(rid, r) for rid, r in self._requests.items() if r.num_prefill_left > 0]
        prefilling.sort(key=lambda item: (item[1].started is None, item[1].started or 0,
                                          item[1].arrival))
        decoding = [rid for rid, r in self._requests.items() if r.decoding]
        tokens = self._assign_prompt_tokens(prefilling[:step.num_prefill_requests],
                                            step.num_prefill_tokens)
        decoded = decoding[:step.num_decode_requests]
        num_other = (step.num_prefill_tokens - sum(tokens.values())
                     + step.num_decode_requests - len(decoded))
        self.ledger.record_step(duration_s, tokens, decoded, num_other)
        for request_id in decoded:
            self._requests[request_id].num_decoded += 1
        for request_id, n in tokens.items():
            request = self._requests[request_id]
            request.num_prefill_left = max(0, request.num_prefill_left - n)
            if request.started is None:
                self._num_started += 1
                request.started = self._num_started
        self._hold_blocks(now, duration_s, set(tokens), set(decoded))
        for request_id in tokens:
            request = self._requests[request_id]
            request.decoding = request.decoding or request.num_prefill_left == 0

    @staticmethod
    def _assign_prompt_tokens(candidates: list[tuple[str, _InFlight]],
                              num_tokens: int) -> dict[str, int]:
        """An even split, each up to what it has left, the smallest filled first (what none
        can take was some other request's: unattributed)."""
        shares = dict.fromkeys((rid for rid, _ in candidates), 0)
        left = num_tokens
        by_need = sorted(candidates, key=lambda item: item[1].num_prefill_left)
        for k, (request_id, request) in enumerate(by_need):
            shares[request_id] = min(request.num_prefill_left, left // (len(by_need) - k))
            left -= shares[request_id]
        for request_id, request in candidates:  # what the even split rounded away
            extra = min(request.num_prefill_left - shares[request_id], left)
            shares[request_id] += extra
            left -= extra
        return {rid: n for rid, n in shares.items() if n > 0}

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
