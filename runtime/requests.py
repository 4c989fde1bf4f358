"""Requests and results that cross between the router and the engine wrappers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm import SamplingParams


@dataclass(frozen=True)
class SamplingSpec:
    """The sampling settings a client may set (a subset of vLLM's SamplingParams)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()  # stop strings (vLLM's rules; the ingress applies them too)
    include_stop_str_in_output: bool = False
    min_tokens: int = 0  # no EOS, stop token or stop string ends the output before this
    skip_special_tokens: bool = True
    logprobs: int | None = None  # top log-probabilities per generated token (0: the token's)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo + logprobs)
    # structured output: vLLM's StructuredOutputsParams fields as JSON (e.g. '{"json": {..}}'
    # or '{"json_object": true}'); such a request runs on one engine (a grammar's state
    # cannot move with the KV cache), see runtime/scheduler/policy.py
    structured: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    @property
    def one_engine(self) -> bool:
        """The request must run whole on one engine: a grammar's state cannot move with the
        KV cache, and the prompt's logprobs come from the engine that computes it."""
        return self.structured is not None or self.prompt_logprobs is not None

    def to_vllm(
        self, max_tokens: int | None = None, kv_transfer_params: dict[str, Any] | None = None,
        detokenize: bool = False, continuation: bool = False,
    ) -> SamplingParams:
        """vLLM's parameters. The engine detokenizes only when it must apply stop strings or
        name the tokens of logprobs (or when asked): the ingress turns token ids into text
        once, for the whole output, so an engine front-end spends no CPU on text nobody reads.
        `continuation`: the request continues after a first token another engine made (one
        less to generate)."""

        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if continuation and self.structured is not None:
            raise ValueError("a structured-output request cannot continue on another engine")
        structured = None if self.structured is None \
            else StructuredOutputsParams(**json.loads(self.structured))
        extra_args = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
        # A continuation's engine does not apply stop strings: its prompt ends with the first
        # token, which can end mid-character, and vLLM's detokenizer then emitted prompt text
        # again (stop strings matched there: seen, "e" ending the output after 2 tokens). The
        # ingress applies them to the whole output and aborts the request at a match.
        stop = list(self.stop) if self.stop and not continuation else None
        # logprobs: the engine names each token the way vLLM's server shows it
        detokenize = detokenize or bool(stop) or self.logprobs is not None
        limit = self.max_tokens if max_tokens is None else max_tokens
        return SamplingParams(
            max_tokens=limit,
            min_tokens=min(limit, max(0, self.min_tokens - (1 if continuation else 0))),
            stop=stop,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=self.logprobs,
            # the prompt's are the prefilling engine's to give, not a continuation's
            prompt_logprobs=None if continuation else self.prompt_logprobs,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            stop_token_ids=list(self.stop_token_ids),
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            detokenize=detokenize,
            structured_outputs=structured,
            extra_args=extra_args,
        )


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    priority: int = 0  # vLLM's priority (lower first): the scheduler's lane, short 0, long 1

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt must have at least one token")
