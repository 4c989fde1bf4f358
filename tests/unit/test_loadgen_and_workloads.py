"""Workloads and the load generator, against a small fake streaming server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from itertools import pairwise

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from benchmarks.loadgen import run_load
from benchmarks.workloads import (
    BenchRequest,
    read_azure_trace,
    read_mooncake_trace,
    synthetic,
    write_sample_traces,
)


def test_synthetic_workloads_are_seeded_and_sized():
    a, b = synthetic("mixed", 500, 10.0, seed=3), synthetic("mixed", 500, 10.0, seed=3)
    assert a == b
    long_ = [r for r in a if r.prompt_len > 4096]
    assert 0.05 < len(long_) / len(a) < 0.15
    assert all(r.prompt_len + r.output_len <= 16384 for r in a)
    mean_gap = a[-1].arrival_s / len(a)
    assert 0.08 < mean_gap < 0.12
    assert all(r.prompt_len <= 512 for r in synthetic("short", 50, 5.0))


def test_sample_traces_round_trip(tmp_path):
    azure, mooncake = write_sample_traces(tmp_path, n=50, seed=1)
    from_azure, from_mooncake = read_azure_trace(azure), read_mooncake_trace(mooncake)
    assert len(from_azure) == len(from_mooncake) == 50
    assert [r.prompt_len for r in from_azure] == [r.prompt_len for r in from_mooncake]
    assert from_azure[0].arrival_s == 0.0
    assert from_azure[-1].arrival_s == pytest.approx(from_mooncake[-1].arrival_s, abs=0.01)


class FakeServer:
    """Streams max_tokens chunks, 10 ms apart, after a 30 ms 'prefill'; 500s on prompt [0].
    The text carries Unicode line separators unescaped, as generated text can."""

    def __init__(self) -> None:
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            if body["prompt"] == [0]:
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)

            async def events():
                await asyncio.sleep(0.03)
                for i in range(body["max_tokens"]):
                    chunk = {"choices": [{"text": "x\u2028y\x85", "index": 0}]}
                    if i == body["max_tokens"] - 1:
                        chunk["timings"] = {"ttft_ms": 30.0}
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                    await asyncio.sleep(0.01)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture(scope="module")
def fake_server():
    server = FakeServer()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


def test_loadgen_records_latencies_open_loop(fake_server):
    requests = [BenchRequest(0.05 * i, 10, 5) for i in range(6)]
    records = asyncio.run(run_load(fake_server, "m", requests, progress=False))
    assert all(not r.error for r in records)
    for record in records:
        assert record.ttft_ms is not None and record.ttft_ms >= 25
        assert record.num_output_tokens == 5 and len(record.itl_ms) == 4
        assert record.tpot_ms is not None and record.tpot_ms >= 5
        assert record.server_timings == {"ttft_ms": 30.0}
    # open loop: sent on schedule (every 50 ms), not after the previous one finished (~80 ms
    # each): a closed loop would send none while the one before is in flight. (Not a bound on
    # the send times: on a loaded machine the whole schedule slips, seen in CI.)
    in_flight = [(r.sent_s, r.sent_s + r.e2e_ms / 1e3) for r in records if r.e2e_ms]
    overlapped = sum(start < prev_end for (_, prev_end), (start, _) in pairwise(in_flight))
    assert overlapped >= 3, in_flight


def test_loadgen_records_errors_and_stays_bounded(fake_server, monkeypatch):
    import benchmarks.loadgen as loadgen

    real = loadgen._one

    async def one(client, model, request, record, prompt, timeout_s):
        await real(client, model, request, record, [0] if record.index == 0 else prompt,
                   timeout_s)

    monkeypatch.setattr(loadgen, "_one", one)
    requests = [BenchRequest(0.0, 10, 3), BenchRequest(0.0, 10, 3), BenchRequest(30.0, 10, 3)]
    start = time.monotonic()
    records = asyncio.run(run_load(fake_server, "m", requests, max_duration_s=1.0,
                                   progress=False))
    assert time.monotonic() - start < 5
    assert "HTTP 500" in records[0].error and not records[1].error
    assert "not finished" in records[2].error


def test_locustfile_runs_a_bounded_load_test(fake_server, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    locustfile = Path(__file__).resolve().parents[2] / "benchmarks" / "locustfile.py"
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host",
         fake_server, "--users", "2", "--spawn-rate", "2", "--max-run-s", "3",
         "--max-context", "600", "--csv", str(tmp_path / "run"), "--only-summary"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    import csv

    with open(tmp_path / "run_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    for name in ("completion", "E2E", "TTFT", "TPOT"):
        assert int(rows[name]["Request Count"]) > 0, name
        assert int(rows[name]["Failure Count"]) == 0, name
    # the fake server's first token comes after 30 ms, the next ones every 10 ms
    assert float(rows["TTFT"]["Median Response Time"]) >= 30
    assert 9 <= float(rows["TPOT"]["Median Response Time"]) < 30


def test_stream_cpu_counts_every_streams_chunks_over_every_url(fake_server):
    from benchmarks.stream_cpu import run_streams

    # three streams round robin over two URLs (the same server): every chunk counted once,
    # the [DONE] line not
    assert asyncio.run(run_streams([fake_server, fake_server], 3, 4)) == 12
