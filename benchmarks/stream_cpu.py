"""What a serving setup's front-end costs per streamed token, without arrivals or queueing:
CPU per SSE chunk of each process, with a fixed number of concurrent streams of a fixed
length (every stream decodes all its tokens: min_tokens = max_tokens).

    python -m benchmarks.stream_cpu [--target colocated] [--streams 16] [--tokens 256]

Starts the target as `disagg bench compare` does (same cores, engines at nice 10), warms it
up with two streams, then runs the streams once, spread round robin over the target's URLs
(plain vLLM has one server per engine). Prints, for every process of the target, CPU ms per
chunk over all chunks (user and system for the front-end processes: our ingress and
replicas, vLLM's API servers). A process that served half the streams spends twice its
figure on each of its own chunks. Under `disagg bench compare` the same processes also pay
for arrivals, prefills and per-request calls; this isolates the per-token part.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import httpx
import psutil

from benchmarks import cpu_usage
from benchmarks.compare import resolve_model, stop_on_sigterm
from benchmarks.idle_cpu import per_process
from benchmarks.targets import MODEL_NAME, add_probe_arguments, probe_target

FRONT_END = ("ingress", "replica", "api_server", "proxy")


async def _stream(client: httpx.AsyncClient, index: int, tokens: int) -> int:
    body = {"model": MODEL_NAME, "prompt": [5 + (j * 7 + index) % 200 for j in range(200)],
            "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True, "stream": True,
            "temperature": 0}
    chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
    return chunks


async def run_streams(urls: list[str], streams: int, tokens: int) -> int:
    """Every stream's SSE chunks, summed."""
    clients = [httpx.AsyncClient(base_url=url, timeout=300) for url in urls]
    try:
        counts = await asyncio.gather(*(_stream(clients[i % len(clients)], i, tokens)
                                        for i in range(streams)))
        return sum(counts)
    finally:
        for client in clients:
            await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_probe_arguments(parser, "benchmarks/results/stream_cpu")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    args = parser.parse_args(argv)
    if args.streams < 1 or args.tokens < 2:
        parser.error("--streams must be at least 1 and --tokens at least 2")
    stop_on_sigterm()
    target = probe_target(args, str(resolve_model(None)))
    try:
        target.start(300)
        time.sleep(8.0)  # start-up work (calibration, first reports) out of the window
        roots = [proc.pid for proc in target.procs]
        asyncio.run(run_streams(target.base_urls, 2, args.tokens))
        print(f"[stream_cpu] {args.target}: {args.streams} streams of {args.tokens} tokens",
              file=sys.stderr, flush=True)
        front: dict[int, tuple[str, psutil.Process, Any]] = {}
        for (pid, _), role in cpu_usage.snapshot(roots).roles.items():
            if role in FRONT_END:
                try:
                    process = psutil.Process(pid)
                    front[pid] = (role, process, process.cpu_times())
                except psutil.Error:
                    continue
        before = cpu_usage.snapshot(roots)
        start = time.perf_counter()
        chunks = asyncio.run(run_streams(target.base_urls, args.streams, args.tokens))
        wall = time.perf_counter() - start
        after = cpu_usage.snapshot(roots)
        if chunks == 0:
            print("no chunk came back", file=sys.stderr)
            return 1
        print(f"{args.target}: {chunks} SSE chunks in {wall:.1f} s "
              f"({chunks / wall:.0f} chunks/s)")
        print("CPU ms per chunk, by process (busiest first):")
        for rate, role, (pid, _) in per_process(before, after, wall)[:12]:
            print(f"  {rate * wall / chunks * 1e3:7.4f}  {role:10s} pid {pid}")
        print("front-end processes, user / system CPU ms per chunk:")
        total = 0.0
        for pid, (role, process, times) in front.items():
            try:
                now = process.cpu_times()
            except psutil.Error:
                continue
            user = (now.user - times.user) / chunks * 1e3
            system = (now.system - times.system) / chunks * 1e3
            total += user + system
            print(f"  {role:10s} pid {pid}: user {user:.4f}, system {system:.4f}")
        print(f"  front-end total: {total:.4f} ms per chunk")
    finally:
        target.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
