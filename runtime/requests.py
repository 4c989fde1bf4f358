"""Requests and results that cross between the router and the engine wrappers."""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    def to_vllm(
        self, max_tokens: int | None = None, kv_transfer_params: dict[str, Any] | None = None,
        detokenize: bool = False,
    ) -> SamplingParams:
        """vLLM's parameters. The engine does not detokenize unless asked: the ingress turns
        token ids into text once, for the whole output (so an engine front-end spends no CPU
        on text nobody reads)."""
        from vllm import SamplingParams

        extra_args = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
        return SamplingParams(
            max_tokens=self.max_tokens if max_tokens is None else max_tokens,
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
