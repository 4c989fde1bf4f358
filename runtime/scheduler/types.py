"""Values the policy reads and returns (frozen, cheap to build by the thousand)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Lane = Literal["short", "long"]
# disaggregated: prefill replica, KV handoff, decode replica; local: a decode replica prefills
# the prompt itself; prefill_local: a prefill replica decodes too (the decode pool is down)
Mode = Literal["disaggregated", "local", "prefill_local"]


@dataclass(frozen=True)
class PrefillLoad:
    """A prefill replica's last report."""

    replica_id: str
    lane: Lane  # the lane this replica serves
    num_pending_tokens: int  # prompt tokens queued or running on it
    reported_at_s: float
    healthy: bool = True
    # its KV cache and sequences (it serves whole requests when the decode pool is full)
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_active_seqs: int = 0
    max_num_seqs: int = 0


@dataclass(frozen=True)
class DecodeLoad:
    """A decode replica's last report."""

    replica_id: str
    num_free_blocks: int
    block_size: int
    num_active_seqs: int
    max_num_seqs: int
    reported_at_s: float
    healthy: bool = True


@dataclass(frozen=True)
class RequestInfo:
    request_id: str
    prompt_len: int
    max_tokens: int
    arrival_s: float
    # must run whole on one engine (structured output, the prompt's logprobs)
    one_engine: bool = False


@dataclass(frozen=True)
class Decision:
    """What to do with one request, and why (reported in its timings)."""

    lane: Lane
    mode: Mode
    prefill_replica: str | None  # None in local mode
    decode_replica: str  # "" in prefill_local mode
    predicted_ttft_ms: float
    reason: str
    predicted_prefill_ms: float = 0.0  # the prompt's own prefill time on the chosen engine


@dataclass(frozen=True)
class Engine:
    """The engine that prefills a request: a prefill replica's, or a decode replica's (a
    local prefill)."""

    prefill_replica: str | None = None
    local_replica: str | None = None

    @staticmethod
    def of(decision: Decision) -> Engine:
        if decision.mode == "local":
            return Engine(local_replica=decision.decode_replica)
        return Engine(prefill_replica=decision.prefill_replica)


@dataclass(frozen=True)
class Rejection:
    """Admission control said no: answer 429 / RESOURCE_EXHAUSTED with Retry-After."""

    reason: str
    retry_after_s: float
    unavailable: bool = False  # no live replica can serve it at all (503, not 429)

    @classmethod
    def no_replica(cls, reason: str) -> Rejection:
        return cls(reason, retry_after_s=1.0, unavailable=True)

    @classmethod
    def no_room(cls, request: RequestInfo) -> Rejection:
        return cls(f"no decode replica can hold {request.prompt_len + request.max_tokens} "
                   "tokens", retry_after_s=0.0)


@dataclass(frozen=True)
class ReplicaReport:
    """What a replica tells the ingress about itself, a few times a second."""

    role: Literal["prefill", "decode"]
    replica_id: str
    num_pending_tokens: int  # prefill: prompt tokens in flight on it
    num_free_blocks: int  # decode: KV blocks not held by requests
    num_total_blocks: int
    block_size: int
    num_active_seqs: int
    max_num_seqs: int
    reported_at_s: float  # time.time() on the replica
    # prefill times measured on this engine at start: ((uncached tokens, ms), ...)
    calibration: tuple[tuple[int, float], ...] = ()
    healthy: bool = True  # False: its engine died or stopped making progress
    call_address: str = ""  # host:port of its direct-call server (runtime/direct_calls.py)
    # its engine's decode step, ms = s0 + s1 * sequences (step_model.py); () not fitted yet
    decode_step_ms: tuple[float, ...] = ()
