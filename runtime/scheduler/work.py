"""The prefill work each engine has been given and not yet finished, one row per replica.

Every engine that prefills (prefill replicas; decode replicas for local prefills) runs short
prompts before long ones (vLLM's priority scheduling, the lane as the priority) and gives a
running long prefill at most `chunk_tokens` per step while others wait (vLLM's
long_prefill_token_threshold), so:
  - a new short prompt waits for the short work ahead of it, plus, while a long prefill is in
    progress, one chunk of it per engine step it shares with it;
  - a new long prompt waits for all the work ahead of it.
The scheduler books every dispatch here with its predicted time (the replica's PrefillModel)
and clears it at the request's first token. Long prompts are sent to an engine one at a time,
in booking order (`has_turn`): two long prefills in one engine would share every step (the cap
applies to both) and both finish late, where one after the other the first finishes early.
Remaining work is estimated per lane. Short prompts go first: the time since the engine last
had short prompts sent to it with none outstanding, less the predicted work of those finished
since, is progress on the ones left. The long prompt running has done what its time since its
turn allows; those held behind it, nothing.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np

from runtime.scheduler.prefill_model import PrefillFit, PrefillModel
from runtime.scheduler.types import Lane

# Never believe that outstanding work is more than this much done (the model may be slow).
MAX_PROGRESS = 0.95
SLOWDOWN_WEIGHT = 0.2  # weight of the newest prefill in the slowdown's running average
MIN_SLOWDOWN, MAX_SLOWDOWN = 0.5, 4.0
# The prefill work sent to an engine lately, per second: a sum of bookings decaying with this
# time constant (about the life of a decode of a few hundred tokens).
RECENT_TAU_S = 5.0
MAX_UTILIZATION = 0.9


@dataclass(frozen=True)
class Booking:
    replica: int
    lane: Lane
    work_ms: float
    num_tokens: int
    alone_at_start: bool  # nothing else was prefilling on the replica when it was sent
    dispatch_seq: int  # the replica's dispatch count right after this one




class PrefillWork:
    def __init__(self, prior: PrefillModel, chunk_tokens: int, step_tokens: int) -> None:
        self.prior = prior
        self.chunk_tokens = chunk_tokens  # a long prefill's share of a step while others wait
        self.step_tokens = step_tokens  # tokens per engine step (max_num_batched_tokens)
        self.fits: list[PrefillFit] = []
        self.a = np.zeros(0)
        self.b = np.zeros(0)
        self.c = np.zeros(0)
        self.short_ms = np.zeros(0)  # predicted work outstanding, by lane
        self.long_ms = np.zeros(0)
        self.head_tokens = np.zeros(0)  # tokens of the long prompt the engine runs now
        self.head_started = np.zeros(0)  # when that long prompt was sent (its turn came)
        self.short_since = np.zeros(0)  # when short prompts were last sent to an idle lane
        self.short_done_ms = np.zeros(0)  # predicted short work finished since short_since
        # remaining_ms for one time, until a booking changes (a decision asks it 3-4 times)
        self._version = 0
        self._remaining: tuple[float, int, tuple[np.ndarray, np.ndarray]] | None = None
        self.num_outstanding = np.zeros(0, dtype=np.int64)
        self.num_dispatched = np.zeros(0, dtype=np.int64)
        self.num_long = np.zeros(0, dtype=np.int64)  # long prompts outstanding
        # measured / predicted prefill time of recent prefills, whatever else ran: how much
        # slower than alone the engine prefills under its current load
        self.slowdown = np.zeros(0)
        # predicted prefill work booked, decayed by RECENT_TAU_S since recent_at
        self.recent_ms = np.zeros(0)
        self.recent_at = np.zeros(0)
        self._long_queues: list[deque[str]] = []  # per replica, in booking order
        self._bookings: dict[str, Booking] = {}
        self._unfitted: set[int] = set()  # replicas with samples not fitted yet

    def add_replica(self) -> int:
        self._version += 1
        self.fits.append(PrefillFit(self.prior))
        for name in ("a", "b", "c", "short_ms", "long_ms", "head_tokens", "head_started",
                     "short_since", "short_done_ms", "recent_ms", "recent_at"):
            setattr(self, name, np.append(getattr(self, name), 0.0))
        self.num_outstanding = np.append(self.num_outstanding, 0)
        self.num_dispatched = np.append(self.num_dispatched, 0)
        self.num_long = np.append(self.num_long, 0)
        self.slowdown = np.append(self.slowdown, 1.0)
        self._long_queues.append(deque())
        self._set_model(len(self.fits) - 1, self.prior)
        return len(self.fits) - 1

    def _set_model(self, i: int, model: PrefillModel) -> None:
        self.a[i], self.b[i], self.c[i] = model.a_ms, model.b_ms, model.c_ms

    def model(self, i: int) -> PrefillModel:
        return PrefillModel(float(self.a[i]), float(self.b[i]), float(self.c[i]))

    def learn(self, i: int, samples: list[tuple[float, float]]) -> None:
        """Prefill times measured on replica i ((uncached tokens, ms) of prompts alone)."""
        fit = self.fits[i]
        for num_tokens, ms in samples:
            fit.add(num_tokens, ms, refit=False)
        fit.refit()
        self._set_model(i, fit.model)
        self._unfitted.discard(i)

    def add_sample(self, i: int, num_tokens: int, ms: float) -> None:
        """A prefill measured on replica i as a request ran alone there: kept for the next
        refit (refit_pending), not fitted now. A refit is a least-squares solve (0.2-0.5 ms),
        and the request whose sample it is waits for its response meanwhile."""
        self.fits[i].add(num_tokens, ms, refit=False)
        self._unfitted.add(i)

    def refit_pending(self, i: int) -> None:
        """Refit replica i's model if it has samples not fitted yet (called as its load
        report comes in, a few times a second)."""
        if i in self._unfitted:
            self.learn(i, [])

    def observe(self, i: int, num_tokens: int, measured_ms: float) -> None:
        """A prefill on replica i took measured_ms (alone or not): track the slowdown."""
        alone_ms = float(self.model(i).predict_ms(num_tokens))
        if alone_ms > 0 and measured_ms > 0:
            ratio = min(MAX_SLOWDOWN, max(MIN_SLOWDOWN, measured_ms / alone_ms))
            self.slowdown[i] += SLOWDOWN_WEIGHT * (ratio - self.slowdown[i])

    def predict_ms(self, num_tokens: int) -> np.ndarray:
        """Every replica's time to prefill num_tokens alone."""
        n = float(num_tokens)
        return self.a + self.b * n + self.c * n * n

    def expected_ms(self, num_tokens: int) -> np.ndarray:
        """Every replica's time to prefill num_tokens under its recent load."""
        return self.predict_ms(num_tokens) * self.slowdown

    def remaining_ms(self, now_s: float) -> tuple[np.ndarray, np.ndarray]:
        """(short, long) predicted work still to do on every replica (module docstring);
        read-only arrays."""
        if (kept := self._remaining) is not None and kept[:2] == (now_s, self._version):
            return kept[2]
        progress = np.clip(1e3 * (now_s - self.short_since) - self.short_done_ms, 0.0,
                           MAX_PROGRESS * self.short_ms)
        short = np.maximum(self.short_ms - progress, 0.0)
        long_ = np.zeros(len(short))
        for i in np.flatnonzero(self.num_long > 0):
            long_[i] = self._long_left_ms(int(i), now_s)
        short.flags.writeable = long_.flags.writeable = False
        self._remaining = (now_s, self._version, (short, long_))
        return short, long_

    def _long_left_ms(self, i: int, now_s: float) -> float:
        """The long prompts booked on replica i: what the running one has left (at least
        1 - MAX_PROGRESS of its prediction; one running past its prediction is expected to
        take as long again as it is late, up to MAX_SLOWDOWN times its prediction in all:
        its progress is not known, and an engine that ran it slower than predicted so far,
        stalled or slowed by what shares it, is likely to go on so), and the whole predicted
        work of those held behind it. Not the engine's busy time less what finished: a
        prefill that finished late would count its overrun as progress on the held ones."""
        queue = self._long_queues[i]
        held_ms = sum(self._bookings[rid].work_ms for rid in itertools.islice(queue, 1, None))
        work_ms = self._bookings[queue[0]].work_ms
        overdue = self._head_overdue(i, now_s)[0]
        started = float(self.head_started[i])
        elapsed_ms = 0.0 if np.isnan(started) else 1e3 * (now_s - started)
        left_ms = max(work_ms - elapsed_ms, (1.0 - MAX_PROGRESS) * work_ms)
        return left_ms + min(overdue, (MAX_SLOWDOWN - 1.0) * work_ms) + held_ms

    def wait_ms(self, now_s: float, num_tokens: int, lane: Lane) -> np.ndarray:
        """Every replica's predicted time until a new prompt of this lane is prefilled."""
        short, long_ = self.remaining_ms(now_s)
        own = self.expected_ms(num_tokens)
        if lane == "long":
            return short + long_ + own
        # the long prefill in progress takes one chunk of every step the short prompt is in
        steps = 1 + np.ceil(num_tokens / max(1, self.step_tokens - self.chunk_tokens))
        return short + own + np.where(long_ > 0, steps * self.long_chunk_ms(), 0.0)

    def delay_to_others_ms(self, num_tokens: int, lane: Lane) -> np.ndarray:
        """Every replica's delay to the prompts outstanding there if a prompt of num_tokens
        and this lane joined them now: a short prompt runs before the long ones, delaying
        each by its prefill; a long one takes a chunk of every step it shares with the short
        prompts still prefilling, delaying each by about one chunk."""
        if lane == "short":
            return self.predict_ms(num_tokens) * self.num_long
        return (self.num_outstanding - self.num_long) * self.chunk_ms(num_tokens)

    def long_chunk_ms(self) -> np.ndarray:
        """Every replica's time for one chunk of the long prefill it runs now: what it adds to
        each step it shares."""
        return self.chunk_ms(self.head_tokens)

    def chunk_ms(self, num_tokens: np.ndarray | int) -> np.ndarray:
        """Every replica's time for one chunk of a long prefill of num_tokens, at its middle
        (where the chunk's attention is the average)."""
        position = np.asarray(num_tokens, dtype=float) / 2
        k = float(self.chunk_tokens)
        return (self.b * k + self.c * k * (k + 2.0 * position)) * self.slowdown

    def utilization(self, now_s: float) -> np.ndarray:
        """Every replica's recent prefill work per unit of time (0 to MAX_UTILIZATION): the
        share of its engine's time that prefills are expected to take while a request placed
        there now decodes. A sequence decoding there shares its steps with them."""
        decay = np.exp(-np.maximum(now_s - self.recent_at, 0.0) / RECENT_TAU_S)
        return np.minimum(self.recent_ms * decay / (1e3 * RECENT_TAU_S), MAX_UTILIZATION)

    def book(self, i: int, request_id: str, lane: Lane, num_tokens: int, now_s: float,
             shared_ms: float = 0.0) -> float:
        """A prefill dispatched to replica i; returns its predicted time: under the engine's
        recent load, plus shared_ms (the decode steps it will share there)."""
        self._version += 1
        work = float(self.expected_ms(num_tokens)[i]) + shared_ms
        decay = np.exp(-max(now_s - float(self.recent_at[i]), 0.0) / RECENT_TAU_S)
        self.recent_ms[i] = self.recent_ms[i] * decay + work
        self.recent_at[i] = now_s
        alone = bool(self.num_outstanding[i] == 0)
        if lane == "short" and self.num_outstanding[i] == self.num_long[i]:
            self.short_since[i], self.short_done_ms[i] = now_s, 0.0
        self.num_dispatched[i] += 1
        self._bookings[request_id] = Booking(i, lane, work, num_tokens, alone,
                                             int(self.num_dispatched[i]))
        self.num_outstanding[i] += 1
        if lane == "long":
            self.long_ms[i] += work
            self.num_long[i] += 1
            self._long_queues[i].append(request_id)
            if len(self._long_queues[i]) == 1:
                self.head_tokens[i], self.head_started[i] = num_tokens, now_s
        else:
            self.short_ms[i] += work
        return work

    def has_turn(self, request_id: str) -> bool:
        """Whether a booked prompt may go to its engine now: short ones at once, long ones once
        every long prompt booked on that engine before it has its first token."""
        booking = self._bookings.get(request_id)
        if booking is None or booking.lane != "long":
            return True
        return self._long_queues[booking.replica][0] == request_id

    def booked_ms(self, request_id: str) -> float:
        """A booked prefill's predicted time."""
        return self._bookings[request_id].work_ms

    def replica_of(self, request_id: str) -> int | None:
        booking = self._bookings.get(request_id)
        return None if booking is None else booking.replica

    def ahead_ms(self, request_id: str, now_s: float) -> float:
        """A booked long prompt waiting for its turn: the predicted work its engine has left
        before it (the work outstanding there, less its own and that of longs booked after
        it)."""
        booking = self._bookings[request_id]
        i = booking.replica
        short, long_ = self.remaining_ms(now_s)
        queue = list(self._long_queues[i])
        behind = queue[queue.index(request_id):] if request_id in queue else [request_id]
        later = sum(self._bookings[rid].work_ms for rid in behind)
        return max(0.0, float(short[i] + long_[i]) - later)

    def head_overdue_ms(self, i: int, now_s: float) -> float:
        """How far the long prefill engine i runs now is past its predicted time (0 if none
        runs, or it is not late)."""
        return self._head_overdue(i, now_s)[0]

    def _head_overdue(self, i: int, now_s: float) -> tuple[float, float]:
        """(how late, predicted time) of the long prefill engine i runs now ((0, 0): none)."""
        queue = self._long_queues[i]
        if not queue:
            return 0.0, 0.0
        head, started = self._bookings[queue[0]], float(self.head_started[i])
        if np.isnan(started):
            return 0.0, 0.0
        return max(0.0, 1e3 * (now_s - started) - head.work_ms), head.work_ms

    def finished(self, request_id: str, now_s: float | None = None) -> bool | None:
        """The prefill's first token came back (or the request ended before it did, or it
        moved to another engine). Returns
        whether it ran alone on the replica its whole life (nothing sent there before it was
        done, nothing outstanding when it was sent): a clean sample of the prefill model.
        None if it was not booked (any more)."""
        self._version += 1
        booking = self._bookings.pop(request_id, None)
        if booking is None:
            return None
        i = booking.replica
        clean = booking.alone_at_start and self.num_dispatched[i] == booking.dispatch_seq
        self.num_outstanding[i] -= 1
        if booking.lane == "long":
            self.long_ms[i] = max(0.0, self.long_ms[i] - booking.work_ms)
            self.num_long[i] -= 1
            queue = self._long_queues[i]
            was_head = queue[0] == request_id
            queue.remove(request_id)
            self.head_tokens[i] = self._bookings[queue[0]].num_tokens if queue else 0.0
            if was_head:  # the next long prompt's turn starts now (unknown: never late)
                self.head_started[i] = np.nan if now_s is None else now_s
        else:
            self.short_ms[i] = max(0.0, self.short_ms[i] - booking.work_ms)
            self.short_done_ms[i] += booking.work_ms
        if self.num_outstanding[i] == self.num_long[i]:
            self.short_ms[i] = 0.0  # no short prompt left: rounding gone with it
        if self.num_outstanding[i] == 0:
            self.long_ms[i] = self.head_tokens[i] = 0.0
        return bool(clean)
