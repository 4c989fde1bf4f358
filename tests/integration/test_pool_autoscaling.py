"""The prefill pool sizes itself: a burst of long prompts scales it from 1 to 2 replicas, the
quiet after it back to 1, and no request fails or misses its TTFT SLO because of either.

A separate `disagg serve` (its own Ray), started as the benchmarks start one; minutes long.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.loadgen import run_load
from benchmarks.targets import EngineSettings, SchedulerSettings, ServeTarget
from benchmarks.workloads import BenchRequest

pytestmark = pytest.mark.slow
SLO_TTFT_MS = 20_000.0  # generous: 2 shared cores, a third engine starting meanwhile


def _live_prefill(url: str) -> int:
    try:
        return int(httpx.get(f"{url}/health", timeout=5).json()["pools"]["prefill"]["live"])
    except (httpx.HTTPError, KeyError, ValueError):
        return -1


def _wait_for(url: str, replicas: int, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if _live_prefill(url) == replicas:
            return time.monotonic() - started
        time.sleep(1.0)
    raise AssertionError(f"the prefill pool never reached {replicas} live replicas in "
                         f"{timeout_s:.0f} s (now {_live_prefill(url)})")


def test_a_burst_scales_the_prefill_pool_up_and_the_quiet_back_down(tiny_model: Path,
                                                                   tmp_path: Path):
    engine = EngineSettings(str(tiny_model), ("0-1", "0-1"), 8448, 16, 2048, 256 << 20)
    target = ServeTarget("disagg", tmp_path, engine, SchedulerSettings(1024, None,
                                                                      slo_ttft_ms=1000.0))
    target.config["prefill"]["autoscaling"] = {"min_replicas": 1, "max_replicas": 2,
                                               "upscale_delay_s": 2.0,
                                               "downscale_delay_s": 30.0}
    target.config["prefill"].pop("cpu_cores", None)
    target.config["decode"].pop("cpu_cores", None)
    try:
        target.start(timeout_s=300)
        url = target.base_urls[0]
        assert _live_prefill(url) == 1
        # 1. a burst: 24 long prompts over 12 s (about a second of prefill work each); the
        #    second replica comes up while it is served
        burst = [BenchRequest(0.5 * i, 6000, 8) for i in range(24)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            load = pool.submit(asyncio.run, run_load(url, "tiny", burst, progress=False,
                                                     max_duration_s=400,
                                                     request_timeout_s=400))
            up_s = _wait_for(url, 2, 240)
            records = load.result()
        assert not [r.error for r in records if r.error]
        # 2. quiet, but a trickle of short requests while the pool shrinks
        trickle = [BenchRequest(2.0 * i, 200, 16) for i in range(20)]
        trickle_records = asyncio.run(run_load(url, "tiny", trickle, progress=False,
                                               max_duration_s=120))
        down_s = _wait_for(url, 1, 120)
        print(f"\nscaled up (the new replica live) {up_s:.0f} s into the burst; back to 1 "
              f"{down_s:.0f} s after the trickle")
        assert not [r.error for r in trickle_records if r.error]
        assert max(r.ttft_ms or 0 for r in trickle_records) < SLO_TTFT_MS
        status = httpx.get(f"{url}/v1/disagg/status", timeout=30).json()
        assert status["scheduler"]["demand"]["prefill"]["replicas"] < 1.0
    finally:
        target.stop()
