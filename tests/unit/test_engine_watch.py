"""An engine process that dies ends the streams on it at once (no Ray, no engine)."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest
from vllm.v1.engine.exceptions import EngineDeadError

from decode_workers.worker import DecodeWorker
from prefill_workers.worker import PrefillWorker
from runtime.replica_common import EngineWatch
from runtime.requests import GenerateRequest, SamplingSpec


class _HangingEngine:
    """An engine whose requests never produce a token (its process died under them)."""

    async def generate(self, *args, **kwargs):  # noqa: ANN002, ANN003
        await asyncio.Event().wait()
        yield None


async def _read(worker: DecodeWorker, request_id: str) -> None:
    request = GenerateRequest(request_id, (1, 2, 3), SamplingSpec(max_tokens=4))
    async for _ in worker.decode(request, None, None):
        pass


def test_engine_died_ends_every_stream_on_it_with_a_replica_failure():
    async def run() -> None:
        worker = DecodeWorker(_HangingEngine(), 16)  # type: ignore[arg-type]
        streams = [asyncio.ensure_future(_read(worker, f"r{i}")) for i in range(3)]
        await asyncio.sleep(0.05)
        assert not any(s.done() for s in streams)  # they wait on the engine
        worker.engine_died("the engine process 123 exited")
        for stream in streams:
            with pytest.raises(EngineDeadError, match="123 exited"):
                await asyncio.wait_for(stream, 1.0)
        with pytest.raises(EngineDeadError):  # and no new one starts on it
            await _read(worker, "late")
        # a caller's own cancellation is still a cancellation
        other = DecodeWorker(_HangingEngine(), 16)  # type: ignore[arg-type]
        stream = asyncio.ensure_future(_read(other, "x"))
        await asyncio.sleep(0.02)
        stream.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stream

    asyncio.run(run())


def test_engine_died_ends_the_prefills_waiting_on_it():
    async def run() -> None:
        worker = PrefillWorker(_HangingEngine(), "token")  # type: ignore[arg-type]
        request = GenerateRequest("p0", (1, 2, 3), SamplingSpec(max_tokens=4))
        prefill = asyncio.ensure_future(worker.prefill(request))
        await asyncio.sleep(0.05)
        assert not prefill.done()
        worker.engine_died("the engine process 7 exited")
        with pytest.raises(EngineDeadError, match="7 exited"):
            await asyncio.wait_for(prefill, 1.0)
        with pytest.raises(EngineDeadError):
            await worker.prefill(GenerateRequest("p1", (1, 2), SamplingSpec(max_tokens=4)))

    asyncio.run(run())


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_the_watch_sees_an_engine_process_die_at_once(pidfd, monkeypatch):
    """Through a pidfd (no polling), or polled every period where the OS has none."""
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open")

    async def run() -> tuple[list[str], float]:
        child = subprocess.Popen(["sleep", "30"])
        deaths: list[str] = []
        try:
            watch = EngineWatch(deaths.append, period_s=0.02, name_prefix="sleep")
            assert (watch._task is None) == pidfd  # no polling task with a pidfd
            await asyncio.sleep(0.1)
            assert deaths == []  # alive: nothing said
            loop = asyncio.get_running_loop()
            killed_at = loop.time()
            child.kill()  # not reaped yet: a zombie counts as gone
            while not deaths and loop.time() - killed_at < 2.0:
                await asyncio.sleep(0.01)
            watch.stop()
            return deaths, loop.time() - killed_at
        finally:
            child.kill()
            child.wait()

    deaths, _ = asyncio.run(run())
    assert len(deaths) == 1 and "exited" in deaths[0]


def test_a_stopped_watch_says_nothing():
    async def run() -> list[str]:
        child = subprocess.Popen(["sleep", "30"])
        deaths: list[str] = []
        try:
            watch = EngineWatch(deaths.append, name_prefix="sleep")
            watch.stop()
            child.kill()
            await asyncio.sleep(0.2)
            return deaths
        finally:
            child.kill()
            child.wait()

    assert asyncio.run(run()) == []
