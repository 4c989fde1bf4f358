"""What each request cost a server that reports no costs (plain vLLM), estimated from the
token arrivals its clients saw, with the rule the runtime uses (runtime/cost.StepLedger).

A vLLM engine never idles while it has work, and every engine step streams one token to each
sequence it decoded (and the first token to each prompt it finished). So, per engine:
  - steps end where token arrivals bunch: arrivals within `gap_ms` of the first one of a
    bunch are one step's outputs;
  - a step starts where the previous one ended, or, if the engine had nothing in flight then,
    when the next request was sent;
  - its participants: the requests that got a later token (each decoded one token), the
    prompts whose first token came (each computed what was left of its prompt), and, with the
    token budget per step left after those, the prompts still waiting, first come first
    served (the chunks of a long prompt before its first token);
  - the step's time is divided among them by scheduled tokens (`StepLedger.record_step`).
So the shares of an engine's requests add up to its busy time as the clients saw it. Not
seen from outside: prefix-cache hits (the benchmarks' prompts are distinct), preemptions,
and tokens the server sent in one event (their step's share goes to the first of them).
KV block-seconds are not estimated.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from benchmarks.loadgen import RequestRecord
from runtime.cost import RequestCost, StepLedger


@dataclass(frozen=True)
class _Timeline:
    index: int
    prompt_len: int
    sent_s: float
    token_s: tuple[float, ...]  # arrival of each streamed event with tokens, first one first

    @property
    def first_s(self) -> float:
        return self.token_s[0]

    @property
    def last_s(self) -> float:
        return self.token_s[-1]


def _timeline(record: RequestRecord) -> _Timeline | None:
    if record.error or record.ttft_ms is None or not record.sent_s:
        return None
    times = [record.sent_s + record.ttft_ms / 1e3]
    for itl_ms in record.itl_ms:
        times.append(times[-1] + itl_ms / 1e3)
    return _Timeline(record.index, record.prompt_len, record.sent_s, tuple(times))


def estimate_costs(records: Iterable[RequestRecord], engine_of: Callable[[RequestRecord], Hashable],
                   budget_tokens: int, gap_ms: float | None = None) -> dict[int, RequestCost]:
    """Each finished request's estimated engine-seconds by phase, by record index.
    engine_of: which engine served a record; budget_tokens: the engine's tokens per step
    (vLLM's max_num_batched_tokens); gap_ms: how far apart one step's outputs may arrive
    (default: half the engine's median inter-token latency)."""
    assert budget_tokens > 0 and (gap_ms is None or gap_ms >= 0)
    by_engine: dict[Hashable, list[_Timeline]] = defaultdict(list)
    for record in records:
        timeline = _timeline(record)
        if timeline is not None:
            by_engine[engine_of(record)].append(timeline)
    costs: dict[int, RequestCost] = {}
    for timelines in by_engine.values():
        itls = [b - a for tl in timelines for a, b in pairwise(tl.token_s)]
        gap_s = gap_ms / 1e3 if gap_ms is not None else 0.5 * float(np.median(itls or [0.0]))
        costs.update(_one_engine(timelines, budget_tokens, gap_s))
    return costs


def _steps(timelines: list[_Timeline], gap_s: float) -> list[tuple[float, list[tuple[int, bool]]]]:
    """(end time, [(index, is first token)]) per step, in time order. A bunch of arrivals is
    one step's outputs unless it spans more than gap_s or a request comes twice (one step
    gives a sequence one token)."""
    arrivals = sorted((t, tl.index, i == 0) for tl in timelines for i, t in enumerate(tl.token_s))
    steps: list[tuple[float, list[tuple[int, bool]]]] = []
    seen: set[int] = set()
    for t, index, is_first in arrivals:
        if not steps or t - steps[-1][0] > gap_s or index in seen:
            steps.append((t, []))
            seen = set()
        steps[-1][1].append((index, is_first))
        seen.add(index)
    return steps


def _one_engine(timelines: list[_Timeline], budget_tokens: int,
                gap_s: float) -> dict[int, RequestCost]:
    steps = _steps(timelines, gap_s)
    ends = [end_s for end_s, _ in steps]
    # each step's start: the previous one's end, or the first send since, if nothing was in flight
    by_sent = sorted(timelines, key=lambda tl: tl.sent_s)
    starts, previous_end, next_sent = [], float("-inf"), 0
    in_flight_until = float("-inf")  # the last token of everything sent so far
    for end_s in ends:
        while next_sent < len(by_sent) and by_sent[next_sent].sent_s <= previous_end:
            in_flight_until = max(in_flight_until, by_sent[next_sent].last_s)
            next_sent += 1
        if in_flight_until > previous_end or next_sent == len(by_sent):
            starts.append(previous_end)
        else:
            starts.append(min(end_s, by_sent[next_sent].sent_s))
        previous_end = end_s
    decoding = [{index for index, is_first in outputs if not is_first} for _, outputs in steps]
    left = [budget_tokens - len(d) for d in decoding]
    prefill: list[dict[int, int]] = [{} for _ in steps]
    step_of_first = {index: i for i, (_, outputs) in enumerate(steps)
                     for index, is_first in outputs if is_first}
    # a prompt's last chunk is in the step that sent its first token, the chunks before it in
    # the steps just before, as far back as it had been sent and as many as its tokens need
    # (earlier first tokens first); they are filled in order, full chunks first
    for tl in sorted(timelines, key=lambda tl: tl.first_s):
        last = step_of_first[tl.index]
        need, first, room = max(1, tl.prompt_len), last, max(0, left[last])
        while room < need and first > 0 and starts[first - 1] >= tl.sent_s:
            first -= 1
            room += max(0, left[first])
        for i in range(first, last + 1):
            take = need if i == last else min(need, max(0, left[i]))
            if take > 0:
                prefill[i][tl.index] = take
                left[i] -= take
                need -= take
    ledger = StepLedger()
    for i, end_s in enumerate(ends):
        ledger.record_step(max(0.0, end_s - starts[i]), prefill[i], decoding[i] - set(prefill[i]))
    return {tl.index: ledger.close(tl.index) for tl in timelines}
