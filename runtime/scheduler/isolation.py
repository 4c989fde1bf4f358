"""What a long prefill placed on an engine costs the short prompts that arrive while it runs.

A short prompt never waits behind a long one while some engine has no long prefill to run:
the scheduler sends it there. While every live engine has one, it shares each of its engine
steps with a chunk of a long prefill, and its first token comes two chunks' time later: the
step running when it arrives and its own (work.wait_ms, for a short prompt that fits one
step beside a chunk). So placing a long prompt on engine e costs the short prompts

    rate x overlap x 2 chunk_e

rate: short prompts arriving per second (recent, `ArrivalRate`); overlap: how long every
engine would have long work, the prompt's own prefill on e or, if sooner, until the first
other engine runs out of long work; chunk_e: one chunk of the prompt's prefill on e. The
policy adds it to a long prompt's first token on each engine it compares: a long prompt waits
behind another on the same engine when the wait costs less than the short prompts would pay
for both engines running long prefills at once.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.scheduler.loads import DecodeTable, PrefillTable

RATE_TAU_S = 10.0  # the arrival rate is a count decaying with this time constant
SHARED_CHUNKS = 2  # chunks of a long prefill a short prompt waits for (module docstring)


class ArrivalRate:
    """Arrivals per second, recent: a count decaying with RATE_TAU_S, divided by it."""

    def __init__(self) -> None:
        self._count = 0.0
        self._at = 0.0

    def _decayed(self, now_s: float) -> float:
        return self._count * math.exp(-max(now_s - self._at, 0.0) / RATE_TAU_S)

    def arrived(self, now_s: float) -> None:
        self._count = self._decayed(now_s) + 1.0
        self._at = max(self._at, now_s)

    def per_s(self, now_s: float) -> float:
        return self._decayed(now_s) / RATE_TAU_S


def short_cost_ms(prefill: PrefillTable, decode: DecodeTable, p_live: np.ndarray,
                  d_live: np.ndarray, num_tokens: int, short_per_s: float,
                  now_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(every prefill replica's, every decode replica's) cost to the short prompts of
    prefilling a long prompt of num_tokens there (module docstring). Dead engines take no
    short prompts, so they count as having long work."""
    num_p = len(prefill.ids)
    if short_per_s <= 0.0 or num_p + len(decode.ids) == 0:
        return np.zeros(num_p), np.zeros(len(decode.ids))
    long_left = np.concatenate([
        np.where(p_live, prefill.work.remaining_ms(now_s)[1], np.inf),
        np.where(d_live, decode.work.remaining_ms(now_s)[1], np.inf),
    ])
    own = np.concatenate([prefill.work.expected_ms(num_tokens),
                          decode.work.expected_ms(num_tokens)])
    chunk = np.concatenate([prefill.work.chunk_ms(num_tokens),
                            decode.work.chunk_ms(num_tokens)])
    # the soonest any other engine is free of long work
    order = np.argsort(long_left, kind="stable")
    first = long_left[order[0]]
    second = long_left[order[1]] if len(order) > 1 else np.inf
    others_free = np.full(len(long_left), first)
    others_free[order[0]] = second
    cost = short_per_s * np.minimum(own, others_free) / 1e3 * SHARED_CHUNKS * chunk
    return cost[:num_p], cost[num_p:]
