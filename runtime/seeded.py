"""Seeded sampling on vLLM's CPU engine, kept from taking the engine down.

vLLM 0.32 rewinds a seeded request's torch.Generator (`get_offset`/`set_offset`) after every
engine step that computed only part of its prompt (chunked prefill: a prompt longer than the
step's token budget or than long_prefill_chunk_tokens, or a step shared with other
requests). CPU generators have no offset: the worker raises "CPU Generator does not use
offset" and the engine core dies, with every request on it (seen: one request, a 3,000-token
prompt, temperature 0.8, seed 3; plain vLLM on the CPU does the same).

So a worker that is about to compute a seeded prompt on a CPU engine first runs the prompt
once without a seed (greedy, one token, thrown away). vLLM's prefix cache then holds every
full block of it, and the seeded request computes only its last block (at most block_size
tokens), which one step takes whole unless other prefills have nearly spent that step's
token budget (a narrow window, not a closed one). A decode engine that loaded the prompt's
KV computes one token of it and needs none of this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runtime.cost import RequestCost
from runtime.engines import token_prompt
from runtime.requests import SamplingSpec

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

    from runtime.cost_tracker import CostTracker

SAMPLING_EPS = 1e-5  # vLLM samples greedily (no generator) below this temperature


def is_seeded_random(sampling: SamplingSpec) -> bool:
    """vLLM gives the request a generator of its own (SamplingType.RANDOM_SEED)."""
    return sampling.seed is not None and sampling.temperature >= SAMPLING_EPS


def needs_unseeded_prefill(engine: AsyncLLM, sampling: SamplingSpec,
                           num_prompt_tokens: int) -> bool:
    if not is_seeded_random(sampling):
        return False
    config = engine.vllm_config
    if config.device_config.device_type != "cpu":
        return False  # CUDA generators have offsets
    # a prompt within one block is its own last block: a first run would cache nothing
    return bool(config.cache_config.enable_prefix_caching) and \
        num_prompt_tokens > config.cache_config.block_size


@dataclass(frozen=True)
class UnseededRun:
    cost: RequestCost = field(default_factory=RequestCost)  # part of the request's cost
    num_cached_tokens: int | None = None  # the prompt's tokens cached before it (None: no run)


async def prefill_unseeded(engine: AsyncLLM, costs: CostTracker, request_id: str,
                           prompt: list[int], priority: int) -> UnseededRun:
    """Run the prompt once, greedily, for one token nobody reads: its full blocks land in
    the engine's prefix cache."""
    from vllm import SamplingParams

    warm_id = f"{request_id}-unseeded"
    costs.begin(warm_id, len(prompt), priority=priority)
    num_cached = 0
    try:
        async for output in engine.generate(token_prompt(prompt),
                                            SamplingParams(max_tokens=1, temperature=0.0,
                                                           detokenize=False),
                                            request_id=warm_id, priority=priority):
            num_cached = output.num_cached_tokens or 0
    finally:
        cost = costs.end(warm_id)
    return UnseededRun(cost, num_cached)
