"""The simulator's event loop and replicas: a prefill replica prefills in chunked steps,
short prompts first; a decode replica batches continuously and prefills too when colocated or
for local-mode requests. Every step's duration comes from the CostModel and goes through the
replica's ReplicaBook (accounting.py). simulator.py wires them into a cluster.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable

from runtime.cost import RequestCost
from runtime.scheduler.sim.accounting import BLOCK_SIZE, ReplicaBook, num_blocks
from runtime.scheduler.sim.cost_model import CostModel
from runtime.scheduler.sim.workload import TraceRequest
from runtime.scheduler.types import Decision, Lane


class Req:
    __slots__ = ("arrival", "finish", "first_token", "lane", "mode", "output_len", "prompt_len",
                 "rid", "key", "decode_id", "prefill_id", "local", "decision", "cost")

    def __init__(self, rid: int, trace: TraceRequest, lane: Lane) -> None:
        self.rid = rid
        self.key = str(rid)
        self.arrival = trace.arrival_s
        self.prompt_len = trace.prompt_len
        self.output_len = trace.output_len
        self.lane = lane
        self.first_token = -1.0
        self.finish = -1.0
        self.decode_id = -1
        self.prefill_id = -1
        self.local = False
        self.decision: Decision | None = None
        self.cost = RequestCost()  # what it has cost on the replicas it has left


class Sim:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, t: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), action))

    def run(self) -> None:
        events = self._events
        while events:
            self.now, _, action = heapq.heappop(events)
            action()


class DecodeReplica:
    """Continuous batching; prefills too when colocated or for local-mode requests."""

    def __init__(self, sim: Sim, index: int, cost: CostModel, chunk_tokens: int,
                 on_finish: Callable[[Req], None], book: ReplicaBook,
                 cap_tokens: int = 0) -> None:
        self.sim, self.index, self.cost, self.book = sim, index, cost, book
        self.chunk_tokens = chunk_tokens
        self.cap_tokens = cap_tokens
        self.on_finish = on_finish
        self.prefill_queue: deque[list] = deque()  # [req, tokens done]
        self.started: dict[str, list] = {}  # prefill_queue items with tokens done
        self.queued_prefill_tokens = 0
        self.admitted: list[Req] = []  # KV arrived, join at the next step
        self.running: list[tuple[int, int, int, Req]] = []  # (finish step, rid, join step, req)
        self.step = 0
        self.busy = False
        self.kv_base = 0  # sum over running of prompt_len - join_step
        self.inverse_lengths = 0.0  # sum over running of 1 / output_len
        self.on_local_prefill_done: Callable[[Req], None] | None = None
        # each step's tokens (one per running sequence), as the ingress counts them, and
        # each one's share of its output (ReplicaColumns.progressed)
        self.on_progress: Callable[[int, int, float], None] | None = None

    @property
    def num_active(self) -> int:
        return len(self.running) + len(self.admitted) + len(self.prefill_queue)

    def enqueue_prefill(self, req: Req) -> None:
        if req.lane == "short":  # short prompts first (priority scheduling)
            at = next((i for i, (r, _) in enumerate(self.prefill_queue) if r.lane == "long"),
                      len(self.prefill_queue))
            self.prefill_queue.insert(at, [req, 0])
        else:
            self.prefill_queue.append([req, 0])
        self.queued_prefill_tokens += req.prompt_len
        self._wake()

    def admit(self, req: Req) -> None:
        self.admitted.append(req)
        self._wake()

    def _wake(self) -> None:
        if not self.busy:
            self.busy = True
            self._start_step()

    def _join(self, req: Req, join_step: int) -> None:
        if req.output_len <= 1:
            req.finish = req.first_token
            self._leave(req)
            return
        heapq.heappush(self.running, (join_step + req.output_len - 2, req.rid, join_step, req))
        self.kv_base += req.prompt_len - join_step
        self.inverse_lengths += 1.0 / req.output_len
        self.book.join(req.key, req.prompt_len + 1)

    def _leave(self, req: Req) -> None:
        req.cost += self.book.leave(req.key)
        self.on_finish(req)

    def _take_handoff(self, req: Req) -> None:
        """The prompt's blocks were held on both sides from the prefill's end until now (the
        producer's lease, as runtime.pipeline.handoff_cost counts it) and moved once."""
        blocks, held_s = num_blocks(req.prompt_len), self.sim.now - req.first_token
        self.book.hold(req.key, blocks, held_s, "decode")
        req.cost += RequestCost(
            prefill_kv_block_s=blocks * held_s,
            bytes_moved=blocks * BLOCK_SIZE * self.cost.model.kv_bytes_per_token)

    def _start_step(self) -> None:
        for req in self.admitted:
            self._take_handoff(req)
            self._join(req, self.step)
        self.admitted.clear()
        batch = len(self.running)
        cap = self.cap_tokens if batch + len(self.prefill_queue) > 1 else 0
        duration, tokens, done = _take_chunks(list(self.prefill_queue), self.chunk_tokens, cap,
                                              self.cost, self.started, 0.0)
        self.queued_prefill_tokens -= sum(tokens.values())
        for req in done:
            self.prefill_queue.remove(self.started[req.key])
        if not tokens and not batch:
            self.busy = False
            return
        duration += self.cost.hardware.step_overhead_s
        if batch:
            kv = self.kv_base + batch * (self.step + 1)
            duration += self.cost.decode_step_s(batch, kv)
        self.book.step(duration, tokens, _prefill_blocks(self.started))
        for req in done:
            del self.started[req.key]
        self.sim.at(self.sim.now + duration, lambda: self._end_step(done, batch))

    def _end_step(self, done: list[Req], batch: int) -> None:
        now = self.sim.now
        if batch and self.on_progress is not None:
            self.on_progress(self.index, batch, self.inverse_lengths)
        running = self.running
        while running and running[0][0] <= self.step:
            _, _, join_step, req = heapq.heappop(running)
            self.kv_base -= req.prompt_len - join_step
            self.inverse_lengths -= 1.0 / req.output_len
            req.finish = now
            self._leave(req)
        for req in done:
            req.first_token = now
            if self.on_local_prefill_done is not None:
                self.on_local_prefill_done(req)
            self._join(req, self.step + 1)
        self.step += 1
        self._start_step()


class PrefillReplica:
    """Chunked prefill in steps of `chunk_tokens`, short prompts first, and while others wait
    no prompt takes more than `cap_tokens` of a step (vLLM's priority policy and
    long_prefill_token_threshold); hands each finished prompt's KV on."""

    def __init__(self, sim: Sim, index: int, cost: CostModel, chunk_tokens: int,
                 cap_tokens: int, on_done: Callable[[Req], None], book: ReplicaBook) -> None:
        self.sim, self.index, self.cost, self.on_done = sim, index, cost, on_done
        self.chunk_tokens, self.cap_tokens = chunk_tokens, cap_tokens
        self.book = book
        self.queues: dict[Lane, deque[list]] = {"short": deque(), "long": deque()}
        self.started: dict[str, list] = {}  # queued items with tokens done
        self.queued_tokens = 0
        self.busy = False

    def enqueue(self, req: Req) -> None:
        self.queues[req.lane].append([req, 0])
        self.queued_tokens += req.prompt_len
        if not self.busy:
            self.busy = True
            self._step()

    def _step(self) -> None:
        items = [*self.queues["short"], *self.queues["long"]]
        if not items:
            self.busy = False
            return
        cap = self.cap_tokens if len(items) > 1 else 0
        duration, tokens, done = _take_chunks(items, self.chunk_tokens, cap, self.cost,
                                              self.started, self.cost.hardware.step_overhead_s)
        for req in done:
            self.queues[req.lane].remove(self.started[req.key])
        self.book.step(duration, tokens, _prefill_blocks(self.started))
        for req in done:
            del self.started[req.key]

        def end() -> None:
            for req in done:
                self.queued_tokens -= req.prompt_len
                req.first_token = self.sim.now
                req.cost += self.book.leave(req.key)
                self.on_done(req)
            self._step()

        self.sim.at(self.sim.now + duration, end)


def _take_chunks(items: list[list], budget: int, cap_tokens: int, cost: CostModel,
                 started: dict[str, list], duration_s: float
                 ) -> tuple[float, dict[str, int], list[Req]]:
    """One engine step's prefill chunks from the queued [req, tokens done] items, in order,
    within the step's token budget (each at most cap_tokens, if set), advanced in place and
    recorded in started. Returns the step's time (from duration_s), the tokens each prompt
    computed, and the prompts this step finished."""
    tokens: dict[str, int] = {}
    done: list[Req] = []
    for item in items:
        if budget <= 0:
            break
        req, offset = item
        take = min(budget, req.prompt_len - offset)
        if cap_tokens > 0:
            take = min(take, cap_tokens)
        duration_s += cost.chunk_s(take, offset)
        budget -= take
        tokens[req.key] = take
        started[req.key] = item
        item[1] += take
        if item[1] >= req.prompt_len:
            done.append(req)
    return duration_s, tokens, done


def _prefill_blocks(started: dict[str, list]) -> dict[str, int]:
    return {key: num_blocks(item[1]) for key, item in started.items()}
