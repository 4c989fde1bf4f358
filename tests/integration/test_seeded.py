"""Seeded sampling with prompts that vLLM prefills in chunks (long_prefill_chunk_tokens is 512
here): vLLM's CPU engine dies on such a request unless the worker prefills it unseeded first
(runtime/seeded.py). The engines must stay up, and a seed must still fix the output."""

from __future__ import annotations

import itertools

from runtime.requests import GenerateRequest, SamplingSpec
from tests.integration.conftest import Cluster
from tests.integration.helpers import colocated_tokens, greedy, make_prompt

_ids = itertools.count()
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


def test_seeded_long_prompt_on_one_engine_is_reproducible(cluster):
    prompt = make_prompt(LONG, seed=61)
    first = cluster.runner.run(_local(cluster, _seeded(prompt, seed=3)))
    again = cluster.runner.run(_local(cluster, _seeded(prompt, seed=3)))
    assert len(first) == 6 and first == again
    _engines_still_serve(cluster)


def test_seeded_long_prompt_disaggregated_is_reproducible(cluster):
    prompt = make_prompt(LONG, seed=62)
    first = cluster.runner.run(cluster.pipeline().generate(_seeded(prompt, seed=5)))
    again = cluster.runner.run(cluster.pipeline().generate(_seeded(prompt, seed=5)))
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
