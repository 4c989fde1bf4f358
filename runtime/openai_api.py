"""OpenAI-compatible request schemas, validation and response bodies (no Ray, no engine)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.cost import RequestCost
from runtime.logprobs import MAX_LOGPROBS
from runtime.pipeline import PhaseTimings
from runtime.requests import SamplingSpec

# The error `type` of each status, as vLLM's OpenAI server names it (clients and tests that
# compare the two servers see the same type for the same refusal).
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               413: "RequestEntityTooLargeError", 429: "RateLimitError",
               500: "InternalServerError", 503: "ServiceUnavailableError",
               504: "GatewayTimeoutError"}
# vLLM's server reports what its request schema (pydantic model and model validators) refuses
# with FastAPI's handler, whose type is the HTTP phrase; what its sampling checks refuse later
# is a "BadRequestError". Clients may branch on the type: we keep the same split.
SCHEMA_ERROR = "Bad Request"
_GREEDY_EPSILON = 1e-5  # vLLM: a temperature below it means greedy sampling


class APIError(Exception):
    """An error the client caused or must see, with its HTTP status and error body
    ({"error": {"message", "type", "param", "code"}}, as OpenAI's and vLLM's servers)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None,
                 type: str | None = None) -> None:  # noqa: A002 - the body's field
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status
        self.message = message
        self.type = type or ERROR_TYPES.get(status, "BadRequestError" if status < 500
                                            else "InternalServerError")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


_INT32_MAX = 2**31 - 1
MAX_N = 16  # sequences per prompt
# Parameters vLLM's server takes that this one does not (yet): refused by name rather than
# silently ignored, since the output would not be what the client asked for. Other unknown
# fields are ignored, as vLLM's server ignores them.
NOT_SUPPORTED = ("prompt_logprobs", "structured_outputs", "logit_bias", "suffix", "use_beam_search",
                 "allowed_token_ids", "bad_words", "tools", "tool_choice", "functions",
                 "prompt_embeds", "return_tokens_as_token_ids", "logprob_token_ids")
REFUSED = ("kv_transfer_params",)  # ours to set, never a client's


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`, as OpenAI and vLLM take it."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None

    def structured(self) -> str | None:
        """vLLM's StructuredOutputsParams fields for it, as JSON (None: plain text), as
        vLLM's server maps a response_format."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return json.dumps({"json_object": True})
        if self.type == "structural_tag":
            raise APIError(400, "unsupported parameter(s): response_format (structural_tag)",
                           param="response_format", code="unsupported_parameter")
        if self.json_schema is None:
            raise APIError(400, "When response_format type is 'json_schema', the "
                           "'json_schema' field must be provided.", param="response_format")
        if self.json_schema.json_schema is None:
            raise APIError(400, "response_format.json_schema.schema must be given",
                           param="response_format")
        return json.dumps({"json": self.json_schema.json_schema})


class _SamplingFields(BaseModel):
    # Unknown fields are collected (not dropped) so the unsupported ones can be named.
    model_config = ConfigDict(extra="allow")

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, le=_INT32_MAX)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=_INT32_MAX)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # what the engine's RNG takes
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    ignore_eos: bool = False
    user: str | None = None
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    min_tokens: int = Field(0, ge=0, le=_INT32_MAX)
    # structured output: the engine constrains the tokens (one engine runs the request)
    response_format: ResponseFormat | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def num_logprobs(self) -> int | None:
        """Top logprobs asked per generated token (0: only the sampled token's); None: no
        logprobs."""
        return None

    def sampling(self, default_max_tokens: int) -> SamplingSpec:
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        num_logprobs = self.num_logprobs()
        if num_logprobs is not None and num_logprobs > MAX_LOGPROBS:
            # vLLM's engine refuses these too (its max_logprobs, 20 by default; -1 asks for
            # the whole vocabulary, more than that)
            raise APIError(400, f"Requested sample logprobs of {num_logprobs}, which is "
                           f"greater than max allowed: {MAX_LOGPROBS}", param="logprobs")
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}",
                           param="max_tokens")
        if self.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({self.min_tokens}) must be less than or equal "
                           f"to max_tokens ({max_tokens})", param="min_tokens")
        if self.n > 1 and self.temperature < _GREEDY_EPSILON:
            raise APIError(400, f"n must be 1 when using greedy sampling, got {self.n}.",
                           param="n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop cannot contain an empty string", param="stop")
        for s in stop:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as err:
                raise APIError(400, f"stop string {s!r} is not valid Unicode text (a lone "
                               "surrogate or not encodable as UTF-8)", param="stop") from err
        if any(t < 0 for t in self.stop_token_ids or ()):
            raise APIError(400, "stop_token_ids must be non-negative", param="stop_token_ids")
        return SamplingSpec(max_tokens=max_tokens, temperature=self.temperature,
                            top_p=self.top_p, top_k=max(self.top_k, 0), seed=self.seed,
                            ignore_eos=self.ignore_eos,
                            stop_token_ids=tuple(self.stop_token_ids or ()),
                            repetition_penalty=self.repetition_penalty,
                            presence_penalty=self.presence_penalty,
                            frequency_penalty=self.frequency_penalty,
                            stop=tuple(stop),
                            include_stop_str_in_output=self.include_stop_str_in_output,
                            min_tokens=self.min_tokens,
                            skip_special_tokens=self.skip_special_tokens,
                            logprobs=num_logprobs,
                            structured=self.response_format.structured()
                            if self.response_format else None)

    def refuse_unsupported(self) -> None:
        # null, false or 0 means "not asked for" (some clients send every field)
        extra = self.model_extra or {}
        unsupported = sorted(k for k in (*NOT_SUPPORTED, *REFUSED)
                             if extra.get(k) not in (None, False, 0, [], {}))
        if unsupported:
            raise APIError(400, f"unsupported parameter(s): {', '.join(unsupported)}",
                           param=unsupported[0], code="unsupported_parameter")


def _logprobs_count(value: int | None, name: str) -> int | None:
    """vLLM's rule for a logprobs count: a number >= 0, or -1 (the whole vocabulary).
    Refused as vLLM's server refuses it: a 400 BadRequestError, not a schema error."""
    if value is not None and value < 0 and value != -1:
        raise APIError(400, f"`{name}` must be a positive value or -1.", param=name)
    return None if value is None else (_VOCABULARY if value == -1 else value)


_VOCABULARY = MAX_LOGPROBS + 1  # what -1 asks for: more than max_logprobs, refused as vLLM does


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None

    def num_logprobs(self) -> int | None:
        return _logprobs_count(self.logprobs, "logprobs")

    @property
    def echo_only(self) -> bool:
        """`echo` with `max_tokens` 0: the prompt back (with its logprobs, if asked), nothing
        generated; as vLLM's server, one token is generated and dropped."""
        return self.echo and self.max_tokens == 0

    def sampling(self, default_max_tokens: int) -> SamplingSpec:
        if self.echo_only:
            return self.model_copy(update={"max_tokens": 1}).sampling(default_max_tokens)
        spec = super().sampling(default_max_tokens)
        # echo with logprobs: the prompt's tokens get theirs too, as vLLM's server gives them
        return replace(spec, prompt_logprobs=spec.logprobs) \
            if self.echo and spec.logprobs is not None else spec

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """One entry per prompt of a batch."""
        prompt = self.prompt
        if prompt == "":  # as vLLM's request validator words it
            raise APIError(400, "Either prompt or prompt_embeds must be provided and non-empty.",
                           param="prompt")
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return prompt  # type: ignore[return-value]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # what the chat template ignores, we do too

    role: str  # any role the chat template takes, as vLLM (which adds custom roles)
    content: str | list[TextPart] | None = None  # text only: no images or audio here
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        message = {"role": self.role, "content": self.text}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, le=_INT32_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = 0

    def num_logprobs(self) -> int | None:
        top = _logprobs_count(self.top_logprobs, "top_logprobs")
        if top and not self.logprobs:
            raise APIError(400, "when using `top_logprobs`, `logprobs` must be set to true.",
                           param="top_logprobs")
        return (top or 0) if self.logprobs else None


def timings_body(timings: PhaseTimings) -> dict[str, Any]:
    body = asdict(timings)
    body["phases_ms"] = timings.phases_ms
    return body


@dataclass(frozen=True)
class ChoiceResult:
    """One finished choice of a response (a prompt of the batch, one of its n samples)."""

    index: int
    prompt_index: int
    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    timings: PhaseTimings
    logprobs: dict[str, Any] | None = None  # the OpenAI `logprobs` object, if asked for


def usage_body(choices: list[ChoiceResult]) -> dict[str, Any]:
    """Each prompt's tokens once (however many samples it had), every choice's output; and
    (an extension) what all of it cost: engine- and block-seconds by phase, bytes, dollars."""
    prompt_tokens = {c.prompt_index: c.timings.num_prompt_tokens for c in choices}
    completion = sum(c.timings.num_output_tokens for c in choices)
    cost = sum((c.timings.cost for c in choices), RequestCost())
    return {"prompt_tokens": sum(prompt_tokens.values()), "completion_tokens": completion,
            "total_tokens": sum(prompt_tokens.values()) + completion, "cost": asdict(cost)}


def response_body(request_id: str, model: str, chat: bool,
                  choices: list[ChoiceResult]) -> dict[str, Any]:
    """A whole (non-streamed) completion or chat completion."""
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        choice: dict[str, Any] = {"index": c.index, "finish_reason": c.finish_reason,
                                  "stop_reason": c.stop_reason, "logprobs": c.logprobs}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        if len(choices) > 1:
            choice["timings"] = timings_body(c.timings)
        out.append(choice)
    return {
        "id": request_id, "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": model, "choices": out,
        "usage": usage_body(choices), "timings": timings_body(choices[0].timings),
    }


class StreamEncoder:
    """The SSE events of one streamed completion. A chunk that only carries text (all but each
    choice's last) is a constant head, encoded once per request, plus the JSON-escaped text."""

    def __init__(self, request_id: str, model: str, chat: bool) -> None:
        self.request_id, self.model, self.chat = request_id, model, chat
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())
        head = json.dumps({"id": request_id, "object": self.object, "created": self.created,
                           "model": model})
        self._head = f'data: {head[:-1]}, "choices": [{{"index": '
        self._tail = ', "finish_reason": null, "logprobs": null}]}\n\n'

    def text(self, index: int, text: str, first: bool,
             logprobs: dict[str, Any] | None = None) -> str:
        """A chunk of a choice's text (with the assistant role on a chat choice's first) and,
        if asked for, the logprobs of its tokens."""
        if logprobs is not None:
            body: dict[str, Any] = {"index": index, "finish_reason": None,
                                    "logprobs": logprobs}
            if self.chat:
                body["delta"] = {"role": "assistant", "content": text} if first \
                    else {"content": text}
            else:
                body["text"] = text
            return sse({"id": self.request_id, "object": self.object,
                        "created": self.created, "model": self.model, "choices": [body]})
        escaped = json.dumps(text)
        if not self.chat:
            return f'{self._head}{index}, "text": {escaped}{self._tail}'
        role = '"role": "assistant", ' if first else ""
        return f'{self._head}{index}, "delta": {{{role}"content": {escaped}}}{self._tail}'

    def last(self, choice: ChoiceResult, text: str, first: bool, usage: bool) -> str:
        """A choice's final chunk: its last text (and its tokens' logprobs, in
        `choice.logprobs`), finish reason and timings (and usage, for a one-choice response
        whose client did not ask for the separate usage chunk)."""
        body: dict[str, Any] = {"index": choice.index, "finish_reason": choice.finish_reason,
                                "stop_reason": choice.stop_reason, "logprobs": choice.logprobs}
        if self.chat:
            body["delta"] = {"role": "assistant", "content": text} if first \
                else {"content": text}
        else:
            body["text"] = text
        chunk: dict[str, Any] = {"id": self.request_id, "object": self.object,
                                 "created": self.created, "model": self.model,
                                 "choices": [body], "timings": timings_body(choice.timings)}
        if usage:
            chunk["usage"] = usage_body([choice])
        return sse(chunk)

    def usage(self, choices: list[ChoiceResult]) -> str:
        """The extra last chunk OpenAI sends with stream_options.include_usage: no choices."""
        return sse({"id": self.request_id, "object": self.object, "created": self.created,
                    "model": self.model, "choices": [], "usage": usage_body(choices),
                    "timings": timings_body(choices[0].timings)})


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n"
