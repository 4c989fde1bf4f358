"""Open-loop load generator for OpenAI-compatible completion servers (disagg or vLLM's own).

Each request is sent at its scheduled arrival time whether or not earlier ones finished (open
loop), streams its completion over SSE, and is recorded: TTFT, inter-token latencies, TPOT,
end-to-end, output tokens, and the server's own `timings` when it sends them. Prompts are
random token ids of the exact length asked for (distinct per request, so no prefix-cache
effects). A progress line goes to stderr while it runs; the run is bounded in time.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from benchmarks.workloads import BenchRequest


@dataclass
class RequestRecord:
    index: int
    prompt_len: int
    max_tokens: int
    scheduled_s: float
    sent_s: float = 0.0
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    server_timings: dict[str, Any] | None = None
    error: str = ""
    # engine-seconds by phase estimated from the token arrivals, for a server that reports no
    # cost of its own (benchmarks/timeline_cost.py)
    estimated_cost: dict[str, float] | None = None

    @property
    def cost(self) -> dict[str, Any] | None:
        """What the server charged the request (timings.cost), else the estimate, if any."""
        reported = (self.server_timings or {}).get("cost")
        return reported if reported is not None else self.estimated_cost

    @property
    def tpot_ms(self) -> float | None:
        if self.ttft_ms is None or self.e2e_ms is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.num_output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tpot_ms"] = self.tpot_ms
        return data


async def _sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """Lines split at "\n" only: SSE's line break. (httpx's aiter_lines also splits at the
    Unicode line boundaries, e.g. U+2028 or U+0085, that JSON strings carry unescaped, and
    cut a generated text's event in two.)"""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()
    if buffer:
        yield buffer.decode()


async def _one(client: httpx.AsyncClient, model: str, request: BenchRequest, record: RequestRecord,
               prompt: list[int], timeout_s: float) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": request.output_len,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    record.sent_s = start
    last = start
    try:
        async with client.stream("POST", "/v1/completions", json=body,
                                 timeout=timeout_s) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in _sse_lines(response):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    record.error = str(data["error"].get("message", data["error"]))
                    return
                now = time.perf_counter()
                if data.get("choices"):
                    if record.ttft_ms is None:
                        record.ttft_ms = (now - start) * 1e3
                    else:
                        record.itl_ms.append((now - last) * 1e3)
                    last = now
                    record.num_output_tokens += 1
                if data.get("usage"):
                    record.num_output_tokens = data["usage"]["completion_tokens"]
                if data.get("timings"):
                    record.server_timings = data["timings"]
        record.e2e_ms = (time.perf_counter() - start) * 1e3
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        record.error = f"{type(err).__name__}: {err}"


async def run_load(base_url: str | list[str], model: str, requests: list[BenchRequest], *,
                   vocab_size: int = 256, max_duration_s: float = 600.0,
                   request_timeout_s: float = 300.0, seed: int = 0,
                   progress: bool = True) -> list[RequestRecord]:
    """Send every request at its arrival time; return one record per request (unsent ones,
    past max_duration_s, carry an error). Several base URLs: round-robin over them, in
    arrival order (client-side, so no proxy of ours sits in front of the servers)."""
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    if not urls:
        raise ValueError("run_load needs at least one base URL")
    rng = random.Random(seed)
    records = [RequestRecord(i, r.prompt_len, r.output_len, r.arrival_s)
               for i, r in enumerate(requests)]
    prompts = [[rng.randrange(3, vocab_size) for _ in range(r.prompt_len)] for r in requests]
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    clients = [httpx.AsyncClient(base_url=url, limits=limits) for url in urls]
    try:
        start = time.perf_counter()

        async def scheduled(i: int) -> None:
            await asyncio.sleep(max(0.0, start + requests[i].arrival_s - time.perf_counter()))
            await _one(clients[i % len(clients)], model, requests[i], records[i], prompts[i],
                       request_timeout_s)

        tasks = [asyncio.ensure_future(scheduled(i)) for i in range(len(requests))]
        reporter = asyncio.ensure_future(_report(records, start)) if progress else None
        done, pending = await asyncio.wait(tasks, timeout=max_duration_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if reporter is not None:
            reporter.cancel()
    finally:
        for client in clients:
            await client.aclose()
    for record in records:
        if record.e2e_ms is None and not record.error:
            record.error = f"not finished within the run's {max_duration_s:.0f} s"
    if progress:
        _print_progress(records, start, final=True)
    return records


async def _report(records: list[RequestRecord], start: float) -> None:
    while True:
        await asyncio.sleep(1.0)
        _print_progress(records, start)


def _print_progress(records: list[RequestRecord], start: float, final: bool = False) -> None:
    sent = sum(1 for r in records if r.sent_s)
    done = sum(1 for r in records if r.e2e_ms is not None)
    errors = sum(1 for r in records if r.error)
    end = "\n" if final else "\r"
    print(f"[load] {time.perf_counter() - start:6.1f} s: sent {sent}/{len(records)}, "
          f"done {done}, errors {errors}", end=end, file=sys.stderr, flush=True)
