"""The global scheduler's request path (the ingress's logic, testable without Ray).

Lifecycle of one request:
  1. `prepare` validates it against the model's context (clear 400s), and asks the global
     scheduler (runtime/scheduler/) for lane, mode and replicas, or a 429 from admission
     control; until the replicas have reported their load, Serve picks them.
  2. `stream` runs it disaggregated: prefill replica -> KV handoff -> decode replica (each
     picked by Serve's least-loaded router), yielding text deltas as tokens arrive.
  3. The last event carries the request's PhaseTimings, which also feed the Prometheus metrics.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from kv_transfer.params import TransferParams
from runtime.app_config import AppConfig
from runtime.execution import Execution
from runtime.messages import PrefillResult, PreparedRequest, TextEvent
from runtime.metrics import Metrics
from runtime.openai_api import APIError
from runtime.pipeline import (
    DecodeClient,
    DisaggPipeline,
    Lane,
    PrefillClient,
)
from runtime.prompts import PromptTokenizer
from runtime.requests import GenerateRequest, SamplingSpec
from runtime.scheduler.live import LiveConfig, LiveScheduler
from runtime.scheduler.policy import PolicyConfig
from runtime.scheduler.types import Decision, Rejection

DEFAULT_TPOT_BUDGET_MS = 100.0  # without slo.tpot_ms
DEFAULT_TTFT_BUDGET_MS = 1000.0  # without slo.ttft_ms
DEFAULT_STEP_TOKENS = 2048  # vLLM's max_num_batched_tokens when the config leaves it unset


def live_config(config: AppConfig) -> LiveConfig:
    """The scheduler's settings, from the app config."""
    engine = config.decode_engine
    kv_bytes_per_token = 131072  # unless the checkpoint's config says otherwise (below)
    try:
        from transformers import AutoConfig

        # local files only: a model name must never turn into a download
        model = AutoConfig.from_pretrained(engine.model, local_files_only=True)
        head_dim = getattr(model, "head_dim", None) or \
            model.hidden_size // model.num_attention_heads
        elem = 4 if engine.dtype == "float32" else 2
        kv_bytes_per_token = 2 * model.num_hidden_layers * model.num_key_value_heads \
            * head_dim * elem
    except (OSError, ValueError, AttributeError):
        pass
    scheduler, slo = config.scheduler, config.slo
    policy = PolicyConfig(
        long_prompt_tokens=scheduler.long_prompt_tokens,
        long_prefill_ms=scheduler.long_prefill_ms,
        stale_after_s=scheduler.stale_after_s,
        local_max_prompt_tokens=scheduler.local_max_prompt_tokens,
        kv_bytes_per_token=kv_bytes_per_token,
        link_bytes_per_s=scheduler.link_bytes_per_s,
        admission_ttft_ms=slo.ttft_ms if scheduler.admission else None,
        max_queued_per_replica=scheduler.max_queued_per_replica,
        decode_balance=scheduler.prefill_replicas_decode,
        disaggregation=config.serving == "disaggregated",
        tpot_budget_ms=slo.tpot_ms or DEFAULT_TPOT_BUDGET_MS,
        tpot_price=(slo.ttft_ms or DEFAULT_TTFT_BUDGET_MS)
        / (slo.tpot_ms or DEFAULT_TPOT_BUDGET_MS),
    )
    utilization = {name: pool.autoscaling.target_utilization if pool.autoscaling else 0.8
                   for name, pool in (("prefill", config.prefill), ("decode", config.decode))}
    return LiveConfig(policy, scheduler.long_lane_replicas, engine.block_size,
                      engine.max_num_seqs, chunk_tokens=engine.long_prefill_chunk_tokens,
                      step_tokens=engine.max_num_batched_tokens or DEFAULT_STEP_TOKENS,
                      ttft_budget_ms=slo.ttft_ms or DEFAULT_TTFT_BUDGET_MS,
                      prefill_utilization=utilization["prefill"],
                      decode_utilization=utilization["decode"])


class NoPrefillPool:
    """The prefill client of colocated serving: there is no prefill pool, and every decision
    is local, so reaching it is a bug."""

    async def prefill(self, request: GenerateRequest, target: str = "") -> PrefillResult:
        raise AssertionError(f"{request.request_id}: colocated serving has no prefill pool")

    async def release(self, transfer: TransferParams) -> None:
        raise AssertionError("colocated serving has no prefill pool")


class Router:
    def __init__(self, config: AppConfig, tokenizer: Any, prefill: PrefillClient | None,
                 decode: DecodeClient, metrics: Metrics,
                 live: LiveScheduler | None = None,
                 prefill_generation: DecodeClient | None = None) -> None:
        self.config = config
        self.live = live
        self.tokenizer = tokenizer
        self.metrics = metrics
        prefill = prefill or NoPrefillPool()
        self.pipeline = DisaggPipeline(prefill, decode)
        # Overlap needs the scheduler's pinned replicas: the prefetch must pull from the
        # prefill replica that runs the prompt, on the decode replica that decodes it.
        self.overlapped = DisaggPipeline(prefill, decode, overlap=config.transfer.overlap)
        # degraded mode: a prefill replica serves whole requests when no decode replica lives
        self.prefill_only = DisaggPipeline(prefill, prefill_generation or decode)
        self.max_model_len = min(config.prefill_engine.max_model_len,
                                 config.decode_engine.max_model_len)
        self.prompts = PromptTokenizer(tokenizer, self.max_model_len)
        self.execution = Execution(self, metrics)
        self._ids = itertools.count()
        self._unstarted: set[str] = set()  # prepared and booked, not streamed yet
        self._id_prefix = secrets.token_hex(4)

    def check_model(self, model: str) -> None:
        if model != self.config.model_name:
            raise APIError(404, f"model {model!r} not found; this server serves "
                           f"{self.config.model_name!r}", "model",
                           "model_not_found")

    def prepare(self, prompt_ids: list[int], sampling: SamplingSpec, kind: str) -> PreparedRequest:
        arrival = time.perf_counter()
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        total = len(prompt_ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise APIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) = "
                f"{total} exceeds the model's context of {self.max_model_len} tokens",
                param="max_tokens" if len(prompt_ids) < self.max_model_len else "prompt",
                code="context_length_exceeded",
            )
        # the policy's lane (prompt length, or predicted prefill time with long_prefill_ms);
        # the decision carries the same lane once replicas have reported
        lane: Lane = self.live.policy.lane(len(prompt_ids)) if self.live is not None else (
            "long" if len(prompt_ids) >= self.config.scheduler.long_prompt_tokens else "short")
        request_id = f"{kind}-{self._id_prefix}-{next(self._ids)}"
        prepared = PreparedRequest(GenerateRequest(request_id, tuple(prompt_ids), sampling),
                                   lane, arrival)
        decision = self.decide(prepared)
        if decision is None:
            return prepared
        # the lane is the engines' priority: short prompts first wherever they wait
        request = replace(prepared.request, priority=0 if decision.lane == "short" else 1)
        self._unstarted.add(request.request_id)
        return replace(prepared, request=request, decision=decision)

    def decide(self, prepared: PreparedRequest) -> Decision | None:
        """The global scheduler's decision (None until replicas have reported). Raises
        APIError 429 when admission control rejects the request."""
        if self.live is None or not self.live.ready:
            if self.config.serving == "colocated":
                raise APIError(503, "the engines are still starting; retry shortly (GET "
                               "/health says when they are up)",
                               code="starting", retry_after_s=5.0)
            return None
        request = prepared.request
        decision = self.live.decide(request.request_id, len(request.prompt_token_ids),
                                    request.sampling.max_tokens,
                                    one_engine=request.sampling.one_engine)
        if isinstance(decision, Rejection) and decision.unavailable:
            raise APIError(503, f"no replica can serve requests now ({decision.reason}); "
                           "retry shortly", code="unavailable",
                           retry_after_s=decision.retry_after_s)
        if isinstance(decision, Rejection):
            self.metrics.rejections.inc()
            raise APIError(429, f"rejected: {decision.reason}",
                           code="overloaded" if decision.reason.startswith("overloaded")
                           else "predicted_ttft_exceeds_slo",
                           retry_after_s=decision.retry_after_s)
        self.metrics.decisions.labels(lane=decision.lane, mode=decision.mode).inc()
        return decision

    def discard(self, prepared: PreparedRequest) -> None:
        """Release the booking of a prepared request that was never streamed (its client left
        before the first byte); a no-op once `stream` started it."""
        if prepared.request.request_id not in self._unstarted:
            return
        self._unstarted.discard(prepared.request.request_id)
        decision = prepared.decision
        if decision is not None and self.live is not None:
            request = prepared.request
            self.live.request_done(decision, request.request_id, len(request.prompt_token_ids),
                                   request.sampling.max_tokens)

    def redecide(self, prepared: PreparedRequest, num_retry: int) -> PreparedRequest:
        """The request again, under a new id, with a new decision (a replica failed)."""
        request = replace(prepared.request,
                          request_id=f"{prepared.request.request_id}-r{num_retry}")
        attempt = replace(prepared, request=request, decision=None)
        decision = self.decide(attempt)
        if decision is None:
            return attempt
        priority = 0 if decision.lane == "short" else 1
        return replace(attempt, decision=decision, request=replace(request, priority=priority))

    def stream(self, prepared: PreparedRequest) -> AsyncIterator[TextEvent]:
        """Run a prepared request (runtime/execution.py): text events as tokens arrive, the
        last one with the request's timings."""
        self._unstarted.discard(prepared.request.request_id)
        return self.execution.stream(prepared)

    def answered(self, prepared: PreparedRequest) -> None:
        """The request's answer went out (the response sent): what is left of its
        bookkeeping runs now (Execution.stream)."""
        self.execution.answered(prepared.request.request_id)
