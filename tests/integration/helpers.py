"""Prompt makers and oracle calls shared by the integration tests."""

from __future__ import annotations

import random
from typing import Any

from runtime.engines import token_prompt
from runtime.requests import SamplingSpec

VOCAB_LOW, VOCAB_HIGH = 3, 258  # byte tokens of the tiny model's tokenizer


def make_prompt(length: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed * 1_000_003 + length)
    return tuple(rng.randint(VOCAB_LOW, VOCAB_HIGH) for _ in range(length))


def greedy(max_tokens: int) -> SamplingSpec:
    return SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def colocated_tokens(
    oracle: Any, request_id: str, prompt: tuple[int, ...], sampling: SamplingSpec
) -> tuple[int, ...]:
    output = None
    async for output in oracle.generate(
        token_prompt(prompt), sampling.to_vllm(), request_id=request_id
    ):
        pass
    assert output is not None
    return tuple(output.outputs[0].token_ids)


async def colocated_text(oracle: Any, request_id: str, prompt: tuple[int, ...],
                         sampling: SamplingSpec) -> str:
    """The text vLLM's own detokenizer makes of the oracle's greedy output (what vLLM's
    OpenAI server would return)."""
    output = None
    async for output in oracle.generate(
        token_prompt(prompt), sampling.to_vllm(detokenize=True),
        request_id=request_id,
    ):
        pass
    assert output is not None
    return str(output.outputs[0].text)
