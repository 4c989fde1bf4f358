"""OpenAI-compatible request schemas, validation and response bodies (no Ray, no engine)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.pipeline import PhaseTimings
from runtime.requests import SamplingSpec

ErrorType = Literal["invalid_request_error", "authentication_error", "not_found_error",
                    "rate_limit_error", "server_error"]


class APIError(Exception):
    """An error the client caused or must see, with its HTTP status and OpenAI error body."""

    def __init__(self, status: int, message: str, type_: ErrorType = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


_INT32_MAX = 2**31 - 1


class _SamplingFields(BaseModel):
    # Unknown fields are collected (not dropped) so they can be refused by name.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, le=_INT32_MAX)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=_INT32_MAX)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # what the engine's RNG takes
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    ignore_eos: bool = False
    user: str | None = None
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def sampling(self, default_max_tokens: int) -> SamplingSpec:
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}",
                           param="max_tokens")
        return SamplingSpec(max_tokens=max_tokens, temperature=self.temperature,
                            top_p=self.top_p, top_k=max(self.top_k, 0), seed=self.seed,
                            ignore_eos=self.ignore_eos,
                            repetition_penalty=self.repetition_penalty,
                            presence_penalty=self.presence_penalty,
                            frequency_penalty=self.frequency_penalty)

    def refuse_unsupported(self) -> None:
        # null or false means "not asked for" (some clients send every field)
        unsupported = sorted(k for k, v in (self.model_extra or {}).items()
                             if v is not None and v is not False)
        if self.n != 1:
            unsupported.append("n")
        if unsupported:
            raise APIError(400, f"unsupported parameter(s): {', '.join(unsupported)}",
                           param=unsupported[0], code="unsupported_parameter")


class CompletionRequest(_SamplingFields):
    prompt: str | list[int]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]  # text parts only: this server takes no images or audio

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


def timings_body(timings: PhaseTimings) -> dict[str, Any]:
    body = asdict(timings)
    body["phases_ms"] = timings.phases_ms
    return body


def usage_body(timings: PhaseTimings) -> dict[str, int]:
    return {"prompt_tokens": timings.num_prompt_tokens,
            "completion_tokens": timings.num_output_tokens,
            "total_tokens": timings.num_prompt_tokens + timings.num_output_tokens}


def completion_body(request_id: str, model: str, text: str, finish_reason: str | None,
                    timings: PhaseTimings) -> dict[str, Any]:
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": usage_body(timings), "timings": timings_body(timings),
    }


def chat_body(request_id: str, model: str, text: str, finish_reason: str | None,
              timings: PhaseTimings) -> dict[str, Any]:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage_body(timings), "timings": timings_body(timings),
    }


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None,
                     timings: PhaseTimings | None) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": request_id, "object": "text_completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason,
                     "logprobs": None}],
    }
    if timings is not None:
        chunk["usage"], chunk["timings"] = usage_body(timings), timings_body(timings)
    return chunk


def chat_chunk(request_id: str, model: str, text: str, finish_reason: str | None,
               timings: PhaseTimings | None, first: bool) -> dict[str, Any]:
    delta: dict[str, Any] = {"content": text}
    if first:
        delta["role"] = "assistant"
    chunk: dict[str, Any] = {
        "id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                     "logprobs": None}],
    }
    if timings is not None:
        chunk["usage"], chunk["timings"] = usage_body(timings), timings_body(timings)
    return chunk


def usage_chunk(request_id: str, model: str, chat: bool,
                timings: PhaseTimings) -> dict[str, Any]:
    """The extra last chunk OpenAI sends with stream_options.include_usage: no choices."""
    return {
        "id": request_id, "created": int(time.time()), "model": model,
        "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
        "usage": usage_body(timings), "timings": timings_body(timings),
    }


class StreamEncoder:
    """The SSE events of one streamed completion. A chunk that only carries text (all but the
    last) is the constant head, encoded once per request, plus the JSON-escaped text."""

    def __init__(self, request_id: str, model: str, chat: bool) -> None:
        self.request_id, self.model, self.chat = request_id, model, chat
        head = json.dumps({"id": request_id,
                           "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": int(time.time()), "model": model})
        self._head = f'data: {head[:-1]}, "choices": [{{"index": 0, '
        self._tail = ', "finish_reason": null, "logprobs": null}]}\n\n'

    def text(self, text: str, first: bool) -> str:
        """A chunk of text (with the assistant role on a chat stream's first chunk)."""
        escaped = json.dumps(text)
        if not self.chat:
            return f'{self._head}"text": {escaped}{self._tail}'
        role = '"role": "assistant", ' if first else ""
        return f'{self._head}"delta": {{{role}"content": {escaped}}}{self._tail}'

    def last(self, text: str, finish_reason: str | None, timings: PhaseTimings,
             first: bool) -> str:
        """The final chunk: the last text, the finish reason, usage and timings."""
        if self.chat:
            return sse(chat_chunk(self.request_id, self.model, text, finish_reason, timings,
                                  first))
        return sse(completion_chunk(self.request_id, self.model, text, finish_reason, timings))


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n"
