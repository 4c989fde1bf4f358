"""Transfer overlapped with prefill, on real vLLM CPU engines, for every payload path: the
decode worker prefetches the prompt's KV layer by layer while the producer computes it.
Token-exact against the colocated engine; faults end cleanly; nothing leaks (no_leaks)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from kv_transfer.params import TransferParams
from prefill_workers.worker import PrefillWorker
from runtime.messages import PrefillResult
from runtime.pipeline import DisaggPipeline
from runtime.requests import GenerateRequest
from tests.integration.conftest import BLOCK_SIZE, SEED_OFFSETS
from tests.integration.helpers import colocated_tokens, greedy, make_prompt

_ids = itertools.count()
LENGTHS = [1, BLOCK_SIZE, BLOCK_SIZE + 1, 3000]


def _request(prompt: tuple[int, ...], max_tokens: int) -> GenerateRequest:
    return GenerateRequest(f"overlap-{next(_ids)}", prompt, greedy(max_tokens))


def _expected(cluster, request: GenerateRequest) -> tuple[int, ...]:
    return cluster.runner.run(colocated_tokens(
        cluster.oracle, f"oracle-{request.request_id}", request.prompt_token_ids,
        request.sampling,
    ))


@pytest.mark.parametrize("length", LENGTHS)
def test_overlapped_equals_colocated(cluster, channel: str, length: int):
    request = _request(make_prompt(length, seed=900 + SEED_OFFSETS[channel]), 5)
    completion = cluster.runner.run(cluster.pipeline(channel, overlap=True).generate(request))
    assert completion.token_ids == _expected(cluster, request)
    t = completion.timings
    assert t.kv_transfer_overlapped, "the KV did not come from the prefetch"
    assert t.num_loaded_tokens == length and t.num_decode_computed_prompt_tokens == 1
    assert t.kv_transfer_bytes > 0 and t.kv_transfer_ms > 0


def test_eight_concurrent_overlapped_requests(cluster, channel: str):
    lengths = [5, 127, 128, 300, 700, 1000, 1500, 2500]
    offset = 950 + SEED_OFFSETS[channel]
    requests = [_request(make_prompt(n, seed=offset + i), 3 + i) for i, n in enumerate(lengths)]
    pipeline = cluster.pipeline(channel, overlap=True)

    async def run_all():
        return await asyncio.gather(*(pipeline.generate(r) for r in requests))

    completions = cluster.runner.run(run_all())
    for request, completion in zip(requests, completions, strict=True):
        assert completion.token_ids == _expected(cluster, request), request.request_id
        assert completion.timings.num_loaded_tokens == len(request.prompt_token_ids)
    assert sum(c.timings.kv_transfer_overlapped for c in completions) >= len(requests) // 2


class _SignallingPrefill:
    """The cluster's prefill worker, telling the test when the pipeline has sent a prefill."""

    def __init__(self, inner: PrefillWorker) -> None:
        self.inner = inner
        self.started = asyncio.Event()

    async def prefill(self, request: GenerateRequest, target: str = "",
                      stream_handle: str = "") -> PrefillResult:
        self.started.set()
        return await self.inner.prefill(request, target, stream_handle=stream_handle)

    async def release(self, transfer: TransferParams) -> None:
        await self.inner.release(transfer)

    async def kv_endpoint(self, target: str = "") -> str:
        return await self.inner.kv_endpoint(target)


def test_client_gone_mid_prefill_leaves_no_stream_or_staging(cluster, channel: str):
    # 1. a long prompt's prefill starts, with its prefetch running on the decode engine
    request = _request(make_prompt(3000, seed=990 + SEED_OFFSETS[channel]), 4)

    async def cancel_mid_prefill() -> None:
        prefill = _SignallingPrefill(cluster.prefill)
        pipeline = DisaggPipeline(prefill, cluster.decoders[channel], overlap=True)
        task = asyncio.ensure_future(pipeline.generate(request))
        # a fixed sleep raced the prefill: warm engines finished 3000 tokens within 0.15 s
        await prefill.started.wait()
        await asyncio.sleep(0.03)  # the 3000-token prefill takes about 0.1 s
        # 2. the client goes away: the prefill is aborted, its stream fails at the producer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    cluster.runner.run(cancel_mid_prefill(), timeout_s=30)
    # 3. no_leaks: no lease, stream, prefetch or staging byte is left on either side


def test_a_failed_prefetch_falls_back_to_a_normal_pull(cluster, channel: str):
    # 1. the prefetch dials a producer that is not there, so it fails
    request = _request(make_prompt(700, seed=995 + SEED_OFFSETS[channel]), 6)
    decoder = cluster.decoders[channel]

    async def run():
        from runtime.engines import free_port

        handle = f"fallback-{request.request_id}-" + "x" * 16
        assert await decoder.prefetch(f"127.0.0.1:{free_port()}", handle,
                                      len(request.prompt_token_ids))
        # 2. the prefill streams under that handle; the decode load finds the failed prefetch
        first = await cluster.prefill.prefill(request, stream_handle=handle)
        assert first.transfer is not None and first.transfer.stream_handle == handle
        tokens, timings = [first.first_token_id], None
        async for chunk in decoder.decode(request, first.first_token_id, first.transfer):
            tokens.extend(chunk.token_ids)
            timings = chunk.timings or timings
        await decoder.cancel_prefetch(handle)
        return tuple(tokens), timings

    tokens, timings = cluster.runner.run(run())
    # 3. ...and pulls from the lease after the prefill instead: same tokens, no error
    assert tokens == _expected(cluster, request)
    assert timings is not None and not timings.transfer_overlapped
    assert timings.num_loaded_tokens == 700 and not timings.transfer_error
