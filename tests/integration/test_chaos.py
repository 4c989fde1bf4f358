"""Chaos: kill a pool's engine or a whole replica under streaming load, on the real app.

For every kill:
  1. streaming requests arrive at 5/s; two seconds in, a process is SIGKILLed;
  2. every request ends (none hangs); a request that had no token yet when the process died
     completes (retried on a live replica, or served degraded by the other pool); one that
     was mid-stream ends with a retryable error (503 class, `replica_failed`) soon after;
  3. /health turns "degraded" quickly, and the pool recovers (Serve replaces the replica);
  4. nothing leaks: no lease on the prefill side, no request left booked in the scheduler.
The measured delays are printed (pytest -s); the bounds asserted are loose (2 shared cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from dataclasses import dataclass

import httpx
import psutil
import pytest

from tests.integration.serve_app import API_KEY, MODEL

pytestmark = pytest.mark.slow  # kills engines: minutes, run with -m slow

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
RECOVERY_S = 240.0


@dataclass
class Outcome:
    sent_at: float
    first_token_at: float | None = None
    ended_at: float | None = None
    error: str = ""


def _processes(app: str, deployment: str, engine: bool) -> list[psutil.Process]:
    """The replica actor processes of a deployment (or their vLLM engine core children)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if f"ServeReplica:{app}:{deployment}" not in cmdline:
            continue
        if not engine:
            found.append(proc)
            continue
        for child in proc.children(recursive=True):
            try:
                if child.name().startswith("VLLM::EngineCore"):
                    found.append(child)
            except psutil.Error:
                continue
    return found


async def _request(client: httpx.AsyncClient, prompt_len: int, max_tokens: int,
                   outcome: Outcome) -> None:
    body = {"model": MODEL, "prompt": [random.randint(3, 250) for _ in range(prompt_len)],
            "max_tokens": max_tokens, "stream": True, "temperature": 0, "ignore_eos": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread())[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    outcome.error = f"{data['error'].get('code')}: {data['error']['message']}"
                    return
                if data.get("choices") and outcome.first_token_at is None:
                    outcome.first_token_at = time.monotonic()
    except httpx.HTTPError as err:
        outcome.error = f"{type(err).__name__}: {err}"
    finally:
        outcome.ended_at = time.monotonic()


async def _load_with_kill(base_url: str, kill) -> tuple[list[Outcome], float, float | None]:
    """20 streaming requests at 5/s; `kill()` at 2 s. Returns the outcomes, the kill time and
    when /health first said degraded (None if it never did)."""
    outcomes = [Outcome(0.0) for _ in range(20)]
    degraded_at: list[float] = []
    rng = random.Random(11)
    async with httpx.AsyncClient(base_url=base_url, headers=HEADERS, timeout=120) as client:
        start = time.monotonic()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + 0.2 * i - time.monotonic()))
            outcomes[i].sent_at = time.monotonic()
            await _request(client, rng.choice([40, 300, 900, 1500]), rng.choice([40, 80]),
                           outcomes[i])

        async def watch_health() -> None:
            async with httpx.AsyncClient(base_url=base_url, timeout=5) as health:
                while not degraded_at:
                    try:
                        view = (await health.get("/health")).json()
                        if view["status"] != "ok":
                            degraded_at.append(time.monotonic())
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.05)

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(outcomes))]
        await asyncio.sleep(2.0)
        kill_at = time.monotonic()
        kill()
        watcher = asyncio.ensure_future(watch_health())
        await asyncio.wait_for(asyncio.gather(*tasks), 180)
        try:
            await asyncio.wait_for(watcher, 5)
        except asyncio.TimeoutError:
            watcher.cancel()
    return outcomes, kill_at, degraded_at[0] if degraded_at else None


def _wait_recovered(base_url: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < RECOVERY_S:
        try:
            response = httpx.get(f"{base_url}/health", timeout=5)
            if response.status_code == 200 and response.json()["status"] == "ok":
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"the app did not recover within {RECOVERY_S:.0f} s")


def _assert_nothing_leaked(base_url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        status = httpx.get(f"{base_url}/v1/disagg/status", headers=HEADERS, timeout=30).json()
        view = status["scheduler"]
        in_flight = sum(lane["in_flight"] for lane in view["lanes"].values())
        leases = status["prefill"]["kv"]["num_leases"]
        if (in_flight, leases) == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert (in_flight, leases) == (0, 0), status


@pytest.mark.parametrize(("deployment", "engine"), [("DecodeServer", True),
                                                    ("PrefillServer", True),
                                                    ("PrefillServer", False)],
                         ids=["decode-engine", "prefill-engine", "prefill-replica"])
def test_a_killed_engine_or_replica_fails_only_mid_stream_requests(serve_app, deployment,
                                                                  engine):
    _wait_recovered(serve_app)  # the previous kill's pool is back
    victims = _processes("disagg", deployment, engine)
    assert victims, f"no {deployment} {'engine' if engine else 'replica'} process found"

    def kill() -> None:
        for proc in victims:
            os.kill(proc.pid, signal.SIGKILL)

    outcomes, kill_at, degraded_at = asyncio.run(_load_with_kill(str(serve_app), kill))
    # mid-stream: the client had a token when its request failed (a first token that was on
    # its way at the kill counts: it came from the prefill replica before the decode one died)
    mid_stream = [o for o in outcomes if o.first_token_at is not None and o.error]
    not_started = [o for o in outcomes if o.first_token_at is None]
    ends = [o.ended_at - kill_at for o in mid_stream if o.ended_at is not None]
    print(f"\n{deployment} {'engine' if engine else 'replica'} killed: "
          f"{len(mid_stream)} mid-stream requests failed (ended {max(ends, default=0):.2f} s "
          f"after the kill at most), {len(not_started)} not started then all completed: "
          f"{all(not o.error for o in not_started)}; /health degraded after "
          f"{(degraded_at - kill_at) if degraded_at else float('nan'):.2f} s")
    assert all(o.ended_at is not None for o in outcomes)  # nothing hangs
    failed_late = [o.error for o in not_started if o.error]
    assert not failed_late, failed_late  # requests with no token yet complete
    for o in mid_stream:  # retryable 503s: the replica, or the KV it held, is gone
        assert o.error.split(":")[0] in ("replica_failed", "kv_transfer_failed"), o.error
    assert max(ends, default=0.0) < 10.0, ends
    assert degraded_at is not None and degraded_at - kill_at < 5.0
    recovery_s = _wait_recovered(serve_app)
    print(f"recovered (both pools live) {recovery_s:.0f} s after the load ended")
    _assert_nothing_leaked(str(serve_app))
