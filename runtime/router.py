"""The global scheduler's request path (the ingress's logic, testable without Ray).

Lifecycle of one request:
  1. `prepare` tokenizes and validates it against the model's context (clear 400s), and puts
     it in a lane: prompts of `long_prompt_tokens` or more are long.
  2. `stream` runs it disaggregated: prefill replica -> KV handoff -> decode replica (each
     picked by Serve's least-loaded router), yielding text deltas as tokens arrive.
  3. The last event carries the request's PhaseTimings, which also feed the Prometheus metrics.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from decode_workers.worker import KVTransferFailed
from runtime.app_config import AppConfig
from runtime.detokenizer import IncrementalDetokenizer
from runtime.metrics import Metrics
from runtime.openai_api import APIError
from runtime.pipeline import DecodeClient, DisaggPipeline, Lane, PhaseTimings, PrefillClient
from runtime.requests import GenerateRequest, SamplingSpec


@dataclass(frozen=True)
class PreparedRequest:
    request: GenerateRequest
    lane: Lane
    arrival_s: float


@dataclass(frozen=True)
class TextEvent:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    timings: PhaseTimings | None = None


class Router:
    def __init__(self, config: AppConfig, tokenizer: Any, prefill: PrefillClient,
                 decode: DecodeClient, metrics: Metrics) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.pipeline = DisaggPipeline(prefill, decode)
        self.max_model_len = min(config.prefill_engine.max_model_len,
                                 config.decode_engine.max_model_len)
        self._ids = itertools.count()
        self._id_prefix = secrets.token_hex(4)

    def check_model(self, model: str) -> None:
        if model != self.config.model_name:
            raise APIError(404, f"model {model!r} not found; this server serves "
                           f"{self.config.model_name!r}", "not_found_error", "model",
                           "model_not_found")

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions",
                           param="messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        vocab_size = len(self.tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"token ids out of the vocabulary [0, {vocab_size}): {bad[:5]}",
                           param="prompt")
        return list(prompt)

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
        lane: Lane = "long" if len(prompt_ids) >= self.config.scheduler.long_prompt_tokens \
            else "short"
        request_id = f"{kind}-{self._id_prefix}-{next(self._ids)}"
        return PreparedRequest(GenerateRequest(request_id, tuple(prompt_ids), sampling), lane,
                               arrival)

    async def stream(self, prepared: PreparedRequest) -> AsyncIterator[TextEvent]:
        detok = IncrementalDetokenizer(self.tokenizer)
        try:
            async for event in self.pipeline.stream(prepared.request, prepared.arrival_s,
                                                    prepared.lane):
                final = event.timings is not None
                text = detok.push(event.token_ids, final=final)
                if event.timings is not None:
                    self.metrics.record(event.timings)
                yield TextEvent(text, event.token_ids, event.finish_reason, event.timings)
        except KVTransferFailed as err:
            self.metrics.record_failure(prepared.lane, "disaggregated", "transfer_failed")
            raise APIError(503, f"KV transfer failed: {err}", "server_error",
                           code="kv_transfer_failed") from err
