"""What the ingress and the pools exchange: requests, results, timings, errors.

No Ray and no engine imports here: the ingress (the global scheduler) loads this module, not
vLLM, to understand what a replica sends back (Ray unpickles a value by importing its class).
"""

from __future__ import annotations

from dataclasses import dataclass

from kv_transfer.params import TransferParams
from runtime.cost import EngineUsage, RequestCost
from runtime.logprobs import TokenLogprobs
from runtime.requests import GenerateRequest
from runtime.scheduler.types import Decision, Lane, Mode


@dataclass(frozen=True)
class PrefillTimings:
    queue_ms: float
    compute_ms: float
    total_ms: float


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token_id: int
    finish_reason: str | None  # set when the first token already ends the request
    transfer: TransferParams | None
    num_prompt_tokens: int
    num_cached_tokens: int
    timings: PrefillTimings
    worker_id: str = ""
    stop_reason: str | int | None = None  # the stop string or token that ended it
    cost: RequestCost = RequestCost()  # its share of the prefill engine (runtime/cost.py)
    first_logprobs: TokenLogprobs | None = None  # the first token's, if the request asked


class InvalidRequest(ValueError):
    """The engine refused the request's parameters (vLLM's own validation when the request
    is added, e.g. a JSON schema its grammar backend cannot compile): the client's error, a
    400, not the replica's."""


class KVTransferFailed(RuntimeError):
    """The prompt's KV blocks could not be loaded and the policy is to fail."""


@dataclass(frozen=True)
class DecodeTimings:
    queue_ms: float  # engine queue, excluding the exposed transfer
    transfer_ms: float  # the pull's own duration
    transfer_bytes: int
    first_token_ms: float  # submit -> first new token (queue + transfer + first step)
    decode_ms: float  # first new token -> last token
    num_loaded_tokens: int
    num_computed_prompt_tokens: int  # prompt tokens this engine computed itself
    transfer_error: str
    worker_id: str = ""
    transfer_exposed_ms: float = 0.0  # what the request waited for its KV (see TransferStats)
    transfer_overlapped: bool = False  # the KV came from a prefetch during the prefill
    cost: RequestCost = RequestCost()  # its share of this engine (runtime/cost.py)


@dataclass(frozen=True)
class DecodeChunk:
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    timings: DecodeTimings | None = None
    stop_reason: str | int | None = None  # the stop string or token that ended it
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, if the request asked
    # the prompt's logprobs (echo with logprobs), on the first chunk or event that has them:
    # one entry per prompt token, the first () (nothing comes before it)
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None

    @property
    def is_final(self) -> bool:
        return self.timings is not None

    @staticmethod
    def merged(chunks: list[DecodeChunk]) -> DecodeChunk:
        """Consecutive chunks of one stream as one (the last one's end, if it ends it)."""
        if len(chunks) == 1:
            return chunks[0]
        last = chunks[-1]
        return DecodeChunk(tuple(t for c in chunks for t in c.token_ids), last.finish_reason,
                           last.timings, last.stop_reason,
                           tuple(e for c in chunks for e in c.logprobs),
                           next((c.prompt_logprobs for c in chunks
                                 if c.prompt_logprobs is not None), None))


@dataclass(frozen=True)
class PhaseTimings:
    """One request's latency split. Phases in order: scheduler queue (ingress), prefill queue
    and compute (prefill engine), KV transfer, decode queue (decode engine, transfer excluded),
    decode compute (first to last decode token, plus the decode engine's first step)."""

    scheduler_queue_ms: float
    prefill_queue_ms: float
    prefill_compute_ms: float
    kv_transfer_ms: float
    kv_transfer_bytes: int
    decode_queue_ms: float
    decode_compute_ms: float
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    num_prompt_tokens: int
    num_output_tokens: int
    num_loaded_tokens: int
    num_decode_computed_prompt_tokens: int
    lane: Lane = "short"
    mode: Mode = "disaggregated"
    prefill_replica: str = ""
    decode_replica: str = ""
    transfer_error: str = ""
    decision_reason: str = ""  # why the scheduler chose this lane, mode and replicas
    # The part of kv_transfer_ms the request waited for (the rest was hidden behind compute).
    kv_transfer_exposed_ms: float = 0.0
    kv_transfer_overlapped: bool = False  # the KV moved during the prefill (prefetch)
    # prompt tokens the prefilling engine found in its prefix cache (not computed)
    num_cached_prompt_tokens: int = 0
    # what the scheduler predicted: this prompt's prefill time on its engine, and the TTFT
    predicted_prefill_ms: float = 0.0
    predicted_ttft_ms: float = 0.0
    num_retries: int = 0  # tries on other replicas after one failed before the first token
    degraded: bool = False  # served by the other pool because one pool had no live replica
    cost: RequestCost = RequestCost()  # engine- and block-seconds by phase, bytes, dollars

    @property
    def phases_ms(self) -> dict[str, float]:
        """The sequential phases, which add up to e2e_ms less the hops between them."""
        return {
            "scheduler_queue": self.scheduler_queue_ms,
            "prefill_queue": self.prefill_queue_ms,
            "prefill_compute": self.prefill_compute_ms,
            "kv_transfer": self.kv_transfer_ms,
            "decode_queue": self.decode_queue_ms,
            "decode_compute": self.decode_compute_ms,
        }


@dataclass(frozen=True)
class StreamEvent:
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    timings: PhaseTimings | None = None
    stop_reason: str | int | None = None  # the stop string or token that ended it
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, if the request asked
    # the prompt's logprobs (echo with logprobs), on the first chunk or event that has them:
    # one entry per prompt token, the first () (nothing comes before it)
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None




REPORT_PERIOD_S = 0.4  # the scheduler books its own dispatches; reports are for liveness & KV
USAGE_EVERY = 5  # reports between two of the engine's busy / wall time (idle capacity)


@dataclass(frozen=True)
class UsageReport:
    """A replica's engine time, sent to the ingress every few seconds: idle capacity is
    reported here, apart from what requests cost."""

    role: str
    replica_id: str
    usage: EngineUsage


@dataclass(frozen=True)
class PreparedRequest:
    request: GenerateRequest
    lane: Lane
    arrival_s: float
    decision: Decision | None = None  # None: Serve's own routing, always disaggregated


@dataclass(frozen=True)
class TextEvent:
    """Text the client can be sent now, the token ids it came from; the last event of a
    request carries its finish reason (and stop string, if one ended it) and timings."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    timings: PhaseTimings | None = None
    stop_reason: str | int | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, if the request asked
    # the prompt's logprobs (echo with logprobs), on the first chunk or event that has them:
    # one entry per prompt token, the first () (nothing comes before it)
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None
