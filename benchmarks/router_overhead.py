"""Router overhead: what the ingress path adds to a one-token request, against the engine alone.

Same tiny model, same prompt, sequential requests (no queueing), medians:
  engine   - vLLM AsyncLLM called in this process (what a bare engine costs);
  vllm     - POST /v1/completions to vLLM's own OpenAI server (one process, same engine
             settings): what a user of plain vLLM pays for HTTP;
  http     - POST /v1/completions to the ingress (direct ingress), which calls the replica the
             scheduler chose (a direct call, runtime/direct_calls.py);
  grpc     - the gRPC API's Generate, same path.
The added latency is (path median - engine median). The HTTP path's median is then split with
the responses' own `timings`: the engine (prefill_queue + prefill_compute as the replica
reports them: for a local prefill, the decode replica's wall time from handing the prompt to
its engine to the first token; for a prefill replica, the engine's own queue and compute
timestamps, without its inter-process hops), the ingress around it (its end-to-end less that:
the scheduler, the calls to the replica and back, what the replica does around its engine),
and the HTTP server and client (the rest). With both engines idle, whether a request runs
local or on the prefill replica follows the replicas' calibrations; the mode is printed.

    python -m benchmarks.router_overhead [--requests 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from runtime.tiny_model import DEFAULT_MODEL_DIR


def _median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e3:7.2f} ms (p10 {_pct(samples, 10):.2f}, " \
           f"p90 {_pct(samples, 90):.2f})"


def _pct(samples: list[float], q: int) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, len(ordered) * q // 100)] * 1e3


async def _engine_samples(model: Path, prompt_ids: list[int], n: int) -> list[float]:
    from runtime.engine_config import EngineConfig
    from runtime.engines import build_engine
    from runtime.requests import SamplingSpec

    engine = build_engine(EngineConfig(model=str(model), kv_cache_bytes=256 << 20), "colocated")
    params = SamplingSpec(max_tokens=1).to_vllm()
    samples = []
    try:
        for i in range(n + 3):
            start = time.perf_counter()
            async for _ in engine.generate({"prompt_token_ids": prompt_ids}, params,
                                           request_id=f"direct-{i}"):
                pass
            if i >= 3:
                samples.append(time.perf_counter() - start)
    finally:
        engine.shutdown()
    return samples


def _http_samples(url: str, body: dict[str, object], n: int,
                  timings: list[dict[str, Any]] | None = None) -> list[float]:
    import httpx

    samples = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(n + 3):
            start = time.perf_counter()
            response = client.post("/v1/completions", json=body)
            elapsed = time.perf_counter() - start
            response.raise_for_status()
            if i >= 3:
                samples.append(elapsed)
                if timings is not None:
                    phases = response.json()["timings"]
                    timings.append({"e2e": phases["e2e_ms"] / 1e3,
                                    "engine": (phases["prefill_queue_ms"]
                                               + phases["prefill_compute_ms"]) / 1e3,
                                    "scheduler": phases["scheduler_queue_ms"] / 1e3,
                                    "mode": phases["mode"]})
    return samples


def _vllm_samples(model: Path, body: dict[str, object], n: int) -> list[float]:
    """vLLM's own OpenAI server, started here with the engine settings of the other paths."""
    import httpx

    from runtime.engine_config import EngineConfig
    from runtime.engines import free_port

    engine = EngineConfig(model=str(model), kv_cache_bytes=256 << 20)
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
            "--dtype", engine.dtype, "--block-size", str(engine.block_size),
            "--max-model-len", str(engine.max_model_len),
            "--max-num-seqs", str(engine.max_num_seqs),
            "--kv-cache-memory-bytes", str(engine.kv_cache_bytes), "--enforce-eager",
            "--disable-uvicorn-access-log", "--disable-log-stats"]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with {server.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("vLLM's server did not start within 300 s")
            time.sleep(1)
        return _http_samples(url, body, n)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50, help="timed requests per path")
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="checkpoint directory")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")

    import grpc
    from transformers import AutoTokenizer

    from protos import inference_pb2 as pb
    from protos import inference_pb2_grpc as pb_grpc
    from runtime.app_config import AppConfig
    from runtime.engines import free_port
    from runtime.serve_cli import start_app, stop_app
    from runtime.tiny_model import is_tiny_model, make_tiny_model

    model = Path(args.model)
    if not is_tiny_model(model) and not (model / "config.json").exists():
        make_tiny_model(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt = "Measure the router: " * 4
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]

    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    print(f"[1/4] engine alone ({args.requests} one-token requests)", flush=True)
    engine = asyncio.run(_engine_samples(model, prompt_ids, args.requests))
    print(f"[2/4] vLLM's own OpenAI server ({args.requests} requests)", flush=True)
    vllm = _vllm_samples(model, body, args.requests)

    config = AppConfig.model_validate({
        "engine": {"model": str(model), "kv_cache_bytes": 256 << 20},
        "prefill": {"num_cpus": 0}, "decode": {"num_cpus": 0},
        "server": {"http_port": free_port(), "grpc_port": free_port(),
                   "served_model_name": "tiny"},
    })
    url = start_app(config, address=None)
    try:
        print(f"[3/4] HTTP path ({args.requests} requests)", flush=True)
        grpc_samples: list[float] = []
        server: list[dict[str, Any]] = []
        http = _http_samples(url, body, args.requests, server)
        print(f"[4/4] gRPC path ({args.requests} requests)", flush=True)
        endpoint = f"{config.server.host}:{config.server.grpc_port}"
        with grpc.insecure_channel(endpoint) as channel:
            stub = pb_grpc.InferenceStub(channel)
            request = pb.GenerateRequest(model="tiny", prompt=prompt, max_tokens=1)
            for i in range(args.requests + 3):
                start = time.perf_counter()
                list(stub.Generate(request, timeout=60))
                if i >= 3:
                    grpc_samples.append(time.perf_counter() - start)
    finally:
        stop_app(config)

    base = statistics.median(engine)
    print(f"\none-token request, {len(prompt_ids)}-token prompt, medians of {args.requests}:")
    print(f"  engine alone          : {_median_ms(engine)}")
    print(f"  vLLM's OpenAI server  : {_median_ms(vllm)}  -> adds "
          f"{(statistics.median(vllm) - base) * 1e3:.2f} ms")
    print(f"  HTTP through ingress  : {_median_ms(http)}  -> adds "
          f"{(statistics.median(http) - base) * 1e3:.2f} ms")
    print(f"  gRPC through ingress  : {_median_ms(grpc_samples)}  -> adds "
          f"{(statistics.median(grpc_samples) - base) * 1e3:.2f} ms")
    server_e2e = [t["e2e"] for t in server]
    in_replica = [t["engine"] for t in server]
    around = [t["e2e"] - t["engine"] for t in server]
    outside = [client - t["e2e"] for client, t in zip(http, server, strict=True)]
    print(f"  (ingress-measured e2e : {_median_ms(server_e2e)})")
    modes = ", ".join(f"{mode} {count}" for mode, count in
                      Counter(t["mode"] for t in server).most_common())
    print(f"\nthe HTTP path, medians of each part (requests ran {modes}):")
    print(f"  engine, as reported   : {_median_ms(in_replica)}  (engine alone "
          f"{base * 1e3:.2f} ms)")
    print(f"  ingress around it     : {_median_ms(around)}  (of which scheduler queue "
          f"{statistics.median(t['scheduler'] for t in server) * 1e3:.2f} ms)")
    print(f"  HTTP server and client: {_median_ms(outside)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
