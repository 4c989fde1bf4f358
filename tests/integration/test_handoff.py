"""KV handoff between two real vLLM CPU engines: token-exact against a colocated engine."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import pytest

from runtime.requests import GenerateRequest
from tests.integration.conftest import BLOCK_SIZE, SEED_OFFSETS
from tests.integration.helpers import colocated_tokens, greedy, make_prompt

_ids = itertools.count()
LENGTHS = [1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 1000, 3000]


def _request(prompt: tuple[int, ...], max_tokens: int) -> GenerateRequest:
    return GenerateRequest(f"req-{next(_ids)}", prompt, greedy(max_tokens))


@pytest.mark.parametrize("max_tokens", [2, 9])
@pytest.mark.parametrize("length", LENGTHS)
def test_disaggregated_equals_colocated(cluster, channel: str, length: int, max_tokens: int):
    prompt = make_prompt(length, seed=max_tokens + SEED_OFFSETS[channel])
    request = _request(prompt, max_tokens)
    completion = cluster.runner.run(cluster.pipeline(channel).generate(request))
    expected = cluster.runner.run(
        colocated_tokens(cluster.oracle, f"oracle-{request.request_id}", prompt, request.sampling)
    )
    assert completion.token_ids == expected
    assert len(completion.token_ids) == max_tokens


@pytest.mark.parametrize("length", [BLOCK_SIZE + 1, 3000])
def test_decode_engine_does_not_recompute_the_prompt(cluster, channel: str, length: int):
    # 1. prefill + handoff of a prompt the decode engine has never seen
    prompt = make_prompt(length, seed=101)
    completion = cluster.runner.run(cluster.pipeline(channel).generate(_request(prompt, 4)))
    timings = completion.timings
    # 2. the connector loaded every prompt token...
    assert timings.num_loaded_tokens == length
    assert timings.kv_transfer_bytes > 0
    # 3. ...and vLLM's own counter says the decode engine computed only the first token,
    #    whose KV the producer never had (far less than the final partial block).
    assert timings.num_decode_computed_prompt_tokens == 1


def test_local_prefix_cache_hit_loads_only_the_rest(cluster):
    # 1. a first request fills the decode engine's prefix cache with the shared prefix
    shared = make_prompt(4 * BLOCK_SIZE, seed=7)
    cluster.runner.run(cluster.pipeline().generate(_request(shared + make_prompt(50, 8), 3)))
    # 2. a second prompt with the same prefix loads only the blocks after it
    prompt = shared + make_prompt(300, seed=9)
    request = _request(prompt, 6)
    completion = cluster.runner.run(cluster.pipeline().generate(request))
    assert completion.timings.num_loaded_tokens == len(prompt) - 4 * BLOCK_SIZE
    expected = cluster.runner.run(
        colocated_tokens(cluster.oracle, f"oracle-{request.request_id}", prompt, request.sampling)
    )
    assert completion.token_ids == expected


def test_corrupted_blocks_change_the_output(cluster):
    """The oracle has teeth: handing decode the right blocks in the wrong order changes tokens."""
    prompt = make_prompt(1000, seed=11)
    request = _request(prompt, 8)

    async def run() -> tuple[tuple[int, ...], tuple[int, ...]]:
        first = await cluster.prefill.prefill(request)
        assert first.transfer is not None and len(first.transfer.block_ids) == 8
        scrambled = dataclasses.replace(
            first.transfer, block_ids=tuple(reversed(first.transfer.block_ids))
        )
        tokens = [first.first_token_id]
        async for chunk in cluster.decode.decode(request, first.first_token_id, scrambled):
            tokens.extend(chunk.token_ids)
        expected = await colocated_tokens(cluster.oracle, f"oracle-{request.request_id}",
                                          prompt, request.sampling)
        return tuple(tokens), expected

    tokens, expected = cluster.runner.run(run())
    assert tokens[0] == expected[0], "the first token comes from the (intact) prefill"
    assert tokens != expected


def test_eight_concurrent_mixed_requests(cluster, channel: str):
    lengths = [5, 127, 128, 300, 700, 1000, 1500, 2500]
    offset = 200 + SEED_OFFSETS[channel]
    requests = [
        _request(make_prompt(n, seed=offset + i), max_tokens=3 + i) for i, n in enumerate(lengths)
    ]
    pipeline = cluster.pipeline(channel)

    async def run_all():
        completions = await asyncio.gather(*(pipeline.generate(r) for r in requests))
        expected = await asyncio.gather(*(
            colocated_tokens(cluster.oracle, f"oracle-{r.request_id}", r.prompt_token_ids,
                             r.sampling)
            for r in requests
        ))
        return completions, expected

    completions, expected = cluster.runner.run(run_all())
    for request, completion, want in zip(requests, completions, expected, strict=True):
        assert completion.token_ids == want, request.request_id
        assert completion.timings.num_loaded_tokens == len(request.prompt_token_ids)


def test_timings_are_consistent(cluster):
    completion = cluster.runner.run(
        cluster.pipeline().generate(_request(make_prompt(600, seed=12), 6))
    )
    t = completion.timings
    assert t.ttft_ms >= t.prefill_compute_ms > 0
    assert t.e2e_ms >= t.ttft_ms + t.kv_transfer_ms
    assert t.kv_transfer_bytes > 0 and t.kv_transfer_ms > 0
    # no overlap on this path: the request waited for the whole pull (and its thread)
    assert t.kv_transfer_exposed_ms >= t.kv_transfer_ms
    assert t.num_output_tokens == 6
