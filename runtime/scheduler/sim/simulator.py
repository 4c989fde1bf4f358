"""Discrete-event simulation of one cluster serving a request stream, in three modes.

  colocated - every replica prefills (chunked, `chunk_tokens` per step) and decodes; requests
              go to the replica with the least queued prefill work.
  static    - fixed prefill and decode pools; every request is split; least-loaded choices.
  policy    - the real GlobalScheduler (runtime/scheduler/policy.py) decides lane, mode and
              replicas from the load it is told, as in the ingress.
Replica times come from a CostModel. Decode replicas batch continuously; a long prefill on a
colocated replica stretches every step of the batch sharing it (that is what TPOT shows).
Every step goes through its replica's StepLedger (accounting.py), as live engines' steps do:
each request ends with its RequestCost, each replica with its EngineUsage.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from runtime.scheduler.loads import DecodeTable, PrefillTable
from runtime.scheduler.policy import GlobalScheduler, PolicyConfig
from runtime.scheduler.sim.accounting import BLOCK_SIZE, ReplicaBook, ReplicaUsage, num_blocks
from runtime.scheduler.sim.cost_model import CostModel
from runtime.scheduler.sim.replicas import DecodeReplica, PrefillReplica, Req, Sim
from runtime.scheduler.sim.workload import TraceRequest
from runtime.scheduler.types import Decision, Lane, RequestInfo

SimMode = Literal["colocated", "static", "policy"]


@dataclass(frozen=True)
class ClusterSpec:
    mode: SimMode
    num_prefill: int
    num_decode: int
    num_long_prefill: int = 0  # policy mode: prefill replicas in the long lane
    chunk_tokens: int = 2048
    cap_tokens: int = 512  # a prompt's share of a step while others wait (0: no cap)
    policy: PolicyConfig = PolicyConfig()
    # each pool's price (as app_config's PoolConfig.cost_per_replica_hour); colocated
    # replicas prefill and decode, as a decode replica does in local mode: the decode price
    prefill_cost_per_replica_hour: float = 0.0
    decode_cost_per_replica_hour: float = 0.0


@dataclass(frozen=True)
class SimRun:
    """A simulated run: every request (finish -1 for one no replica could hold) with its
    RequestCost, and every replica's usage over wall_s, from the first arrival to the end."""

    reqs: list[Req]
    replicas: tuple[ReplicaUsage, ...]
    wall_s: float


def simulate(spec: ClusterSpec, cost: CostModel, trace: list[TraceRequest]) -> SimRun:
    """Serve the trace: first-token and finish times, and what each request cost."""
    sim = Sim()
    reqs: list[Req] = []
    capacity_blocks = cost.kv_capacity_tokens // BLOCK_SIZE
    books: list[ReplicaBook] = []

    if spec.mode == "colocated":
        replicas = []
        for i in range(spec.num_prefill + spec.num_decode):
            books.append(ReplicaBook(f"c{i}", spec.decode_cost_per_replica_hour))
            replicas.append(DecodeReplica(sim, i, cost, spec.chunk_tokens, lambda r: None,
                                          books[-1]))

        def route_colocated(req: Req) -> None:
            best = min(replicas, key=lambda r: (r.queued_prefill_tokens, r.num_active))
            req.local, req.decode_id = True, best.index
            best.enqueue_prefill(req)

        route: Callable[[Req], None] = route_colocated
    else:
        route = _split_router(spec, cost, sim, capacity_blocks, books)
    for rid, trace_req in enumerate(trace):
        req = Req(rid, trace_req, "short")
        reqs.append(req)
        sim.at(trace_req.arrival_s, functools.partial(route, req))
    sim.run()
    wall_s = sim.now - min((r.arrival for r in reqs), default=0.0)
    return SimRun(reqs, tuple(book.usage(wall_s) for book in books), wall_s)


def _split_router(spec: ClusterSpec, cost: CostModel, sim: Sim, capacity_blocks: int,
                  books: list[ReplicaBook]) -> Callable[[Req], None]:
    """Static or policy routing over a prefill pool and a decode pool."""
    policy = spec.mode == "policy"
    cap = spec.cap_tokens if policy else 0
    free_blocks = np.full(spec.num_decode, capacity_blocks, dtype=np.int64)
    scheduler: GlobalScheduler | None = None
    if policy:
        num_short = spec.num_prefill - spec.num_long_prefill
        long_lane: list[Lane] = ["long"] * spec.num_long_prefill
        short_lane: list[Lane] = ["short"] * num_short
        lanes = long_lane + short_lane
        model = cost.prefill_model()
        scheduler = GlobalScheduler(
            spec.policy,
            PrefillTable([f"p{i}" for i in range(spec.num_prefill)], lanes, model, cap,
                         spec.chunk_tokens),
            DecodeTable([f"d{i}" for i in range(spec.num_decode)],
                        [capacity_blocks] * spec.num_decode, BLOCK_SIZE, 512, model, cap,
                        spec.chunk_tokens))
        # every replica's decode step, as the live replicas fit and report theirs
        step = cost.decode_step_model()
        for table in (scheduler.prefill, scheduler.decode):
            for i in range(len(table.ids)):
                table.report_decode_step(i, (step.s0_ms, step.s1_ms))

    def on_finish(req: Req) -> None:
        if scheduler is None:
            free_blocks[req.decode_id] += num_blocks(req.prompt_len + req.output_len)
            return
        tpot_ms = 1e3 * (req.finish - req.first_token) / max(1, req.output_len - 1)
        scheduler.decode.released(scheduler.decode.ids[req.decode_id],
                                  num_blocks(req.prompt_len + req.output_len),
                                  req.output_len, tpot_ms, req.output_len)

    def first_token(req: Req) -> None:
        if scheduler is not None and req.decision is not None:
            scheduler.first_token(req.decision, str(req.rid))
            progress(req.decode_id, 1, 1.0 / max(1, req.output_len))

    def progress(decode_id: int, num_tokens: int, fraction: float) -> None:
        if scheduler is not None:
            scheduler.decode.progressed(scheduler.decode.ids[decode_id], num_tokens, fraction)

    prefill_books = [ReplicaBook(f"p{i}", spec.prefill_cost_per_replica_hour)
                     for i in range(spec.num_prefill)]
    decode_books = [ReplicaBook(f"d{i}", spec.decode_cost_per_replica_hour)
                    for i in range(spec.num_decode)]
    books.extend(prefill_books + decode_books)
    decoders = [DecodeReplica(sim, i, cost, spec.chunk_tokens, on_finish, decode_books[i], cap)
                for i in range(spec.num_decode)]
    for d in decoders:
        d.on_local_prefill_done = first_token
        d.on_progress = progress

    def on_prefilled(req: Req) -> None:
        first_token(req)
        target = decoders[req.decode_id]
        sim.at(sim.now + cost.transfer_s(req.prompt_len), lambda: target.admit(req))

    prefillers = [PrefillReplica(sim, i, cost, spec.chunk_tokens, cap, on_prefilled,
                                 prefill_books[i]) for i in range(spec.num_prefill)]

    def route_policy(req: Req) -> None:
        assert scheduler is not None
        info = RequestInfo(str(req.rid), req.prompt_len, req.output_len, req.arrival)
        decision = scheduler.decide(info, sim.now)
        if not isinstance(decision, Decision):
            return  # cannot be held anywhere: counted as failed
        req.decision, req.lane = decision, decision.lane
        req.decode_id = scheduler.decode.index[decision.decode_replica]
        if decision.mode == "local":
            req.local = True
            decoders[req.decode_id].enqueue_prefill(req)
        else:
            assert decision.prefill_replica is not None
            req.prefill_id = scheduler.prefill.index[decision.prefill_replica]
            prefillers[req.prefill_id].enqueue(req)

    def route_static(req: Req) -> None:
        need = num_blocks(req.prompt_len + req.output_len)
        fits = np.flatnonzero(free_blocks >= need)
        if not len(fits):
            fits = np.flatnonzero(capacity_blocks >= need)
            if not len(fits):
                return
        d = int(fits[np.argmin([decoders[i].num_active for i in fits])])
        free_blocks[d] -= need
        req.decode_id = d
        prefiller = min(prefillers, key=lambda r: r.queued_tokens)
        req.prefill_id = prefiller.index
        prefiller.enqueue(req)

    return route_policy if policy else route_static
