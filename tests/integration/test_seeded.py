"""Seeded sampling with prompts that vLLM prefills in chunks (long_prefill_chunk_tokens is 512
here): vLLM's CPU engine dies on such a request unless the worker prefills it unseeded first
(runtime/seeded.py). The engines must stay up, and a seed must still fix the output."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import TypeVar

from runtime.requests import GenerateRequest, SamplingSpec
from tests.integration.conftest import Cluster
from tests.integration.helpers import colocated_tokens, greedy, make_prompt

_ids = itertools.count()
T = TypeVar("T")
LONG = 1500  # three chunks of 512 tokens


def _seeded(prompt: tuple[int, ...], seed: int, max_tokens: int = 6) -> GenerateRequest:
    sampling = SamplingSpec(max_tokens=max_tokens, temperature=0.9, seed=seed,
                            ignore_eos=True)
    return GenerateRequest(f"seeded-{next(_ids)}", prompt, sampling)


async def _local(cluster: Cluster, request: GenerateRequest) -> tuple[int, ...]:
    tokens: list[int] = []
    async for chunk in cluster.decode.decode(request, None, None):
        tokens.extend(chunk.token_ids)
    return tuple(tokens)


def _engines_still_serve(cluster: Cluster) -> None:
    """A greedy request after the seeded ones, on both engines, equals the oracle's."""
    prompt = make_prompt(200, seed=4242)
    request = GenerateRequest(f"after-{next(_ids)}", prompt, greedy(4))
    completion = cluster.runner.run(cluster.pipeline().generate(request))
    expected = cluster.runner.run(colocated_tokens(cluster.oracle, f"oracle-{request.request_id}",
                                                   prompt, request.sampling))
    assert completion.token_ids == expected


async def _with_company(work: Callable[[], Awaitable[T]], company: Awaitable[object]) -> T:
    """work, started while another prompt is in the same engine: vLLM then caps each prefill
    at long_prefill_chunk_tokens per step (alone, a prompt within the budget is not split)."""
    other = asyncio.ensure_future(company)
    await asyncio.sleep(0.3)  # the other prompt is being prefilled, then decodes 30 tokens
    result = await work()
    await other
    return result


def _company(cluster: Cluster, seed: int, on_prefill_engine: bool = False) -> Awaitable[object]:
    """A greedy request of 30 tokens on the decode engine, or on the prefill engine (whose
    own requests end at their first token: this one stays to decode)."""
    request = GenerateRequest(f"company-{next(_ids)}", make_prompt(LONG, seed), greedy(30))
    if on_prefill_engine:
        return colocated_tokens(cluster.prefill.engine, request.request_id,
                                request.prompt_token_ids, request.sampling)
    return _local(cluster, request)


def test_seeded_long_prompt_on_one_engine_is_reproducible(cluster):
    prompt = make_prompt(LONG, seed=61)
    first = cluster.runner.run(_with_company(lambda: _local(cluster, _seeded(prompt, seed=3)),
                                             _company(cluster, 71)))
    again = cluster.runner.run(_with_company(lambda: _local(cluster, _seeded(prompt, seed=3)),
                                             _company(cluster, 72)))
    assert len(first) == 6 and first == again
    _engines_still_serve(cluster)


def test_seeded_long_prompt_disaggregated_is_reproducible(cluster):
    prompt = make_prompt(LONG, seed=62)
    first = cluster.runner.run(_with_company(
        lambda: cluster.pipeline().generate(_seeded(prompt, seed=5)), _company(cluster, 73, True)))
    again = cluster.runner.run(_with_company(
        lambda: cluster.pipeline().generate(_seeded(prompt, seed=5)), _company(cluster, 74, True)))
    assert len(first.token_ids) == 6 and first.token_ids == again.token_ids
    # the unseeded run computed the prompt: the phases still say so
    assert first.timings.num_cached_prompt_tokens == 0
    _engines_still_serve(cluster)


def test_seeds_still_differ(cluster):
    """The unseeded first run must not make the seed irrelevant: other seeds, other samples
    (20 tokens at temperature 0.9 over ~256 byte tokens: equal by chance is negligible)."""
    prompt = make_prompt(LONG, seed=63)
    a = cluster.runner.run(_local(cluster, _seeded(prompt, seed=1, max_tokens=20)))
    b = cluster.runner.run(_local(cluster, _seeded(prompt, seed=2, max_tokens=20)))
    assert a != b


def test_a_seed_gives_the_same_output_in_every_mode(cluster):
    """One engine, or prefill + handoff + decode: the same seed, the same tokens (the decode
    engine resamples the first token from the loaded KV, so its generator draws as one
    engine's does). The scheduler picks the mode by load: without this, a seeded request's
    output changed with the load."""
    for length in (40, 700):
        prompt = make_prompt(length, seed=64)
        split = cluster.runner.run(cluster.pipeline().generate(_seeded(prompt, seed=9,
                                                                       max_tokens=12)))
        assert split.timings.num_loaded_tokens == length - 1  # all but the last token
        local = cluster.runner.run(_local(cluster, _seeded(prompt, seed=9, max_tokens=12)))
        assert split.token_ids == local, length
