"""Soak: hours of serving in minutes. Nothing may grow: memory, threads, KV blocks, bookings.

    python -m benchmarks.soak --minutes 10 --rate 3
    python -m benchmarks.soak --minutes 10 --rate 3 --target vllm   # the same on plain vLLM

  1. start `disagg serve` (the bench's disagg target: pinned engines) and warm it up (a few
     requests, then one window of the soak's own load, not measured); with
     `--target vllm`, plain vLLM's OpenAI server with the same engine settings instead (the
     load goes to its first server: one engine doing what disagg's two share), as the
     reference for what the engines themselves do;
  2. send the `mixed` workload open-loop at `rate` for `minutes`, in windows; a fifth of the
     streams are cancelled by their client after a few tokens (the abort path);
  3. after each window, sample every process of the app (RSS, threads) and the app's own view
     (KV cache usage, leases, requests in flight, the scheduler's bookings);
  4. at the end, with the load stopped: KV usage 0, no lease, nothing in flight, and every
     process's RSS and thread count within 10% (RSS: and 32 MiB) of its first sample after
     warm-up. Exit 1 if not. A table of the samples goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from benchmarks import cpu_usage
from benchmarks.compare import resolve_model, warmup_requests
from benchmarks.loadgen import run_load
from benchmarks.targets import EngineSettings, SchedulerSettings, ServeTarget, Target, VllmTarget
from benchmarks.workloads import synthetic

RSS_TOLERANCE = 0.10
RSS_SLACK_BYTES = 32 << 20  # allocator noise on small processes


@dataclass(frozen=True)
class Sample:
    at_s: float
    rss: dict[str, int]  # role:pid -> bytes
    threads: dict[str, int]
    kv_usage: float
    leases: int
    in_flight: int


def sample(roots: list[int], base_url: str, started: float, ours: bool = True) -> Sample:
    rss, threads = {}, {}
    for root in roots:
        try:
            procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                with proc.oneshot():
                    role = cpu_usage.role_of(proc.name(), " ".join(proc.cmdline()),
                                             proc.pid == root)
                    key = f"{role}:{proc.pid}"
                    rss[key] = proc.memory_info().rss
                    threads[key] = proc.num_threads()
            except psutil.Error:
                continue
    if not ours:  # plain vLLM: no view of its blocks and requests from outside
        return Sample(time.monotonic() - started, rss, threads, 0.0, 0, 0)
    status = httpx.get(f"{base_url}/v1/disagg/status", timeout=30).json()
    in_flight = sum(lane["in_flight"] for lane in status["scheduler"]["lanes"].values())
    return Sample(time.monotonic() - started, rss, threads,
                  float((status["decode"]["load"] or {}).get("kv_cache_usage", 0.0)),
                  int(status["prefill"]["kv"]["num_leases"]), in_flight)


async def _cancelling_load(base_url: str, n: int, rate: float, seed: int) -> None:
    """Streams that their client drops after a few tokens, spread over the window."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        async def one(delay: float) -> None:
            await asyncio.sleep(delay)
            body = {"model": "tiny", "prompt": [rng.randint(3, 250) for _ in range(300)],
                    "max_tokens": 200, "stream": True, "ignore_eos": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for i, _ in _enumerate(response.aiter_lines()):
                    if i >= rng.randint(2, 10):
                        break  # the client goes away mid-stream

        await asyncio.gather(*(one(i / rate) for i in range(n)), return_exceptions=True)


async def _enumerate(lines):  # type: ignore[no-untyped-def]
    i = 0
    async for line in lines:
        yield i, line
        i += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=3.0, help="requests/s")
    parser.add_argument("--window-s", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--cores", default="0,1")
    parser.add_argument("--out", default="", help="directory for the server's logs")
    parser.add_argument("--target", choices=("disagg", "vllm"), default="disagg",
                        help="what to soak: disagg (default) or plain vLLM's server")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.window_s <= 0:
        parser.error("--minutes, --rate and --window-s must be positive")
    out = Path(args.out or tempfile.mkdtemp(prefix="soak-"))
    out.mkdir(parents=True, exist_ok=True)
    cores = tuple(c for c in args.cores.split(",") if c)
    engine = EngineSettings(str(resolve_model(None)), cores, 8448, 32, 2048, 512 << 20)
    ours = args.target == "disagg"
    target: Target = ServeTarget("disagg", out, engine, SchedulerSettings(1024, None)) \
        if ours else VllmTarget(out, engine)
    samples: list[Sample] = []
    try:
        target.start()
        base = target.base_urls[0]
        roots = [p.pid for p in target.procs]
        asyncio.run(run_load(base, "tiny", warmup_requests(8192), progress=False))
        started = time.monotonic()
        window = -1  # one window of the soak's own load first, not measured: the engines'
        # working set (buffers for every chunk shape at this load) is in use from then on,
        # so what grows after it is what a longer run would keep growing
        while window < 0 or time.monotonic() - started < 60 * args.minutes:
            n = max(1, round(args.rate * args.window_s))
            requests = synthetic("mixed", n, args.rate, max_context=8192, seed=window)
            load = run_load(base, "tiny", requests, progress=False, seed=window,
                            max_duration_s=args.window_s * 3)

            async def both(load=load, n=n, window=window):  # type: ignore[no-untyped-def]
                return await asyncio.gather(load, _cancelling_load(base, n // 5, args.rate / 5,
                                                                   window))

            records, _ = asyncio.run(both())
            errors = sum(1 for r in records if r.error)
            time.sleep(3.0)  # what was cancelled is freed
            samples.append(sample(roots, base, started, ours))
            window += 1
            if window == 0:
                started = time.monotonic()
                samples[-1] = sample(roots, base, started, ours)
            print(f"[soak] window {window}{' (warm-up)' if window == 0 else ''}: "
                  f"{len(records)} requests, {errors} errors, "
                  f"{n // 5} cancelled; kv {samples[-1].kv_usage:.3f}, leases "
                  f"{samples[-1].leases}, in flight {samples[-1].in_flight}; engine RSS MiB "
                  f"{_engine_rss_mib(samples[-1])}", flush=True)
    finally:
        target.stop()
    return report(samples)


def _engine_rss_mib(sample: Sample) -> str:
    """The engine processes' RSS: a trend across windows tells growth that levels off (the
    KV cache's pages are resident only once a block is first written) from a leak."""
    return " ".join(f"{rss / 2**20:.0f}" for key, rss in sorted(sample.rss.items())
                    if key.startswith("engine:"))


def report(samples: list[Sample]) -> int:
    first, last = samples[0], samples[-1]
    print("\nprocess                       RSS MiB first -> last   threads first -> last")
    problems = []
    for key in sorted(first.rss):
        if key not in last.rss:
            problems.append(f"{key} exited during the soak")
            continue
        rss0, rss1 = first.rss[key], last.rss[key]
        t0, t1 = first.threads[key], last.threads[key]
        print(f"{key:<28} {rss0 / 2**20:8.0f} -> {rss1 / 2**20:8.0f}   {t0:5d} -> {t1:5d}")
        if rss1 > rss0 * (1 + RSS_TOLERANCE) + RSS_SLACK_BYTES:
            problems.append(f"{key}: RSS grew {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB")
        if t1 > t0 * (1 + RSS_TOLERANCE) + 2:
            problems.append(f"{key}: threads grew {t0} -> {t1}")
    print(f"\nat the end: KV usage {last.kv_usage:.3f}, leases {last.leases}, in flight "
          f"{last.in_flight}, after {last.at_s / 60:.1f} minutes")
    if last.kv_usage > 0 or last.leases or last.in_flight:
        problems.append("blocks, leases or requests still held after the load stopped")
    for problem in problems:
        print(f"FAIL: {problem}")
    print("soak: " + ("FAILED" if problems else "passed: nothing grew, nothing held"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
