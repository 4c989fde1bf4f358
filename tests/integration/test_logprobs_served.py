"""Logprobs through the disaggregated path (the first token's from the prefill engine, the
rest from the decode engine) and the local one, against one engine that does it all."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from runtime.engines import token_prompt
from runtime.logprobs import from_vllm
from runtime.requests import GenerateRequest
from tests.integration.helpers import greedy, make_prompt

_ids = itertools.count()
TOP = 3


async def _oracle(cluster, request_id: str, prompt: tuple[int, ...], sampling) -> tuple:
    final = None
    async for output in cluster.oracle.generate(token_prompt(prompt),
                                                sampling.to_vllm(), request_id=request_id):
        final = output
    completion = final.outputs[0]
    return tuple(completion.token_ids), from_vllm(completion.logprobs, 0,
                                                  len(completion.token_ids))


async def _local(cluster, request: GenerateRequest) -> tuple:
    tokens, logprobs = [], []
    async for chunk in cluster.decode.decode(request, None, None):
        tokens.extend(chunk.token_ids)
        logprobs.extend(chunk.logprobs)
    return tuple(tokens), tuple(logprobs)


def _assert_same(got: tuple, expected: tuple) -> None:
    assert len(got) == len(expected)
    for position, (ours, theirs) in enumerate(zip(got, expected, strict=True)):
        # the same tokens, ranks and names; values as close as two engines' float32 math
        assert [(t, name) for t, _, name in ours] == [(t, name) for t, _, name in theirs], \
            position
        for (_, a, _), (_, b, _) in zip(ours, theirs, strict=True):
            assert a == pytest.approx(b, abs=1e-3), position


@pytest.mark.parametrize("length", [40, 700])
def test_logprobs_disaggregated_and_local_equal_one_engines(cluster, length: int):
    prompt = make_prompt(length, seed=300 + length)
    sampling = dataclasses.replace(greedy(6), logprobs=TOP)
    request = GenerateRequest(f"lp-{next(_ids)}", prompt, sampling)
    completion = cluster.runner.run(cluster.pipeline().generate(request))
    tokens, expected = cluster.runner.run(_oracle(cluster, f"oracle-{request.request_id}",
                                                  prompt, sampling))
    assert completion.token_ids == tokens
    assert completion.timings.mode == "disaggregated"
    # 1. every token has its entry: the sampled one first, then the top ones
    assert len(completion.logprobs) == len(tokens)
    for token_id, entry in zip(tokens, completion.logprobs, strict=True):
        assert entry[0][0] == token_id and len(entry) in (TOP, TOP + 1)
        assert all(name is not None for _, _, name in entry), entry  # the engine named them
    _assert_same(completion.logprobs, expected)
    # 2. the same request prefilled and decoded on the decode engine alone
    local = GenerateRequest(f"lp-{next(_ids)}", prompt, sampling)
    local_tokens, local_logprobs = cluster.runner.run(_local(cluster, local))
    assert local_tokens == tokens
    _assert_same(local_logprobs, expected)


def test_no_logprobs_unless_asked(cluster):
    request = GenerateRequest(f"lp-{next(_ids)}", make_prompt(30, seed=5), greedy(4))
    completion = cluster.runner.run(cluster.pipeline().generate(request))
    assert completion.logprobs == () and len(completion.token_ids) == 4
