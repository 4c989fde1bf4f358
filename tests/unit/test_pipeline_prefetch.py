"""The split path with overlap: the prefill goes out without waiting for the decode
replica's prefetch call, and every prefetch that started is ended; pure Python fakes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from kv_transfer.params import TransferParams
from runtime.clients import RemotePrefill
from runtime.messages import DecodeChunk, DecodeTimings, PrefillResult, PrefillTimings
from runtime.pipeline import DisaggPipeline
from runtime.requests import GenerateRequest, SamplingSpec


class _Prefill:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.prefilled = asyncio.Event()
        self.handles: list[str] = []

    async def prefill(self, request: GenerateRequest, target: str = "",
                      stream_handle: str = "") -> PrefillResult:
        self.handles.append(stream_handle)
        self.prefilled.set()
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("prefill failed")
        return PrefillResult(request.request_id, 7, None, None, len(request.prompt_token_ids),
                             0, PrefillTimings(1.0, 2.0, 3.0))

    async def release(self, transfer: TransferParams) -> None:
        pass

    async def kv_endpoint(self, target: str = "") -> str:
        return "127.0.0.1:1"


class _Decode:
    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.prefill = None  # set by the test: the prefetch reply waits for the prefill
        self.cancelled: list[str] = []

    async def prefetch(self, endpoint: str, stream_handle: str, num_tokens: int,
                       target: str = "") -> bool:
        assert self.prefill is not None
        await self.prefill.prefilled.wait()  # replies only once the prefill went out
        return self.accept

    async def cancel_prefetch(self, stream_handle: str, target: str = "") -> None:
        self.cancelled.append(stream_handle)

    async def decode(self, request: GenerateRequest, first_token_id: int | None,
                     transfer: TransferParams | None, *, target: str = ""
                     ) -> AsyncIterator[DecodeChunk]:
        yield DecodeChunk((8,), "length", DecodeTimings(0.0, 0.0, 0, 1.0, 1.0, 0, 0, ""))


def _request() -> GenerateRequest:
    return GenerateRequest("r1", (1, 2, 3), SamplingSpec(max_tokens=2))


async def _run(prefill: _Prefill, decode: _Decode) -> list[tuple[int, ...]]:
    decode.prefill = prefill  # type: ignore[assignment]
    pipeline = DisaggPipeline(prefill, decode, overlap=True)
    stream = pipeline.stream(_request(), prefill_target="p0", decode_target="d0")
    tokens = [event.token_ids async for event in stream]
    return tokens


@pytest.mark.parametrize("accept", [True, False])
def test_the_prefill_does_not_wait_for_the_prefetch_call(accept: bool) -> None:
    # the fake decode replica answers its prefetch call only after the prefill was sent: a
    # pipeline that waited for that answer first would hang here
    prefill, decode = _Prefill(), _Decode(accept)
    tokens = asyncio.run(asyncio.wait_for(_run(prefill, decode), 5.0))
    assert tokens[0] == (7,) and (8,) in tokens
    assert prefill.handles[0]  # the prefill streams under the handle either way
    # a started prefetch is ended (a no-op once the decode claimed it); a refused one is not
    assert decode.cancelled == (prefill.handles if accept else [])


def test_a_failed_prefill_ends_the_prefetch_once_it_started() -> None:
    prefill, decode = _Prefill(fail=True), _Decode(accept=True)
    with pytest.raises(RuntimeError, match="prefill failed"):
        asyncio.run(asyncio.wait_for(_run(prefill, decode), 5.0))
    assert decode.cancelled == prefill.handles


def test_a_prefill_replicas_kv_endpoint_is_asked_once() -> None:
    calls: list[str] = []

    class _Method:
        async def remote(self, target_replica: str = "") -> str:
            calls.append(target_replica)
            return f"{target_replica}:9"

    class _Handle:
        kv_endpoint = _Method()

        def options(self, **_: object) -> _Handle:
            return self

    async def ask() -> list[str]:
        client = RemotePrefill(_Handle())
        return [await client.kv_endpoint(t) for t in ("p0", "p0", "p1", "p0")]

    assert asyncio.run(ask()) == ["p0:9", "p0:9", "p1:9", "p0:9"]
    assert calls == ["p0", "p1"]
