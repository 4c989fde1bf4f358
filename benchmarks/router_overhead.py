"""Router overhead: what the ingress path adds to a one-token request, against the engine alone.

Same tiny model, same prompt, sequential requests (no queueing), medians:
  engine   - vLLM AsyncLLM called in this process (what a bare engine costs);
  http     - POST /v1/completions through Ray Serve's proxy, the ingress and the prefill replica;
  grpc     - the gRPC API's Generate, same path minus the HTTP proxy.
The added latency is (path median - engine median).

    python -m benchmarks.router_overhead [--requests 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50, help="timed requests per path")
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="checkpoint directory")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")

    import grpc
    import httpx
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

    print(f"[1/3] engine alone ({args.requests} one-token requests)", flush=True)
    engine = asyncio.run(_engine_samples(model, prompt_ids, args.requests))

    config = AppConfig.model_validate({
        "engine": {"model": str(model), "kv_cache_bytes": 256 << 20},
        "prefill": {"num_cpus": 0}, "decode": {"num_cpus": 0},
        "server": {"http_port": free_port(), "grpc_port": free_port(),
                   "served_model_name": "tiny"},
    })
    url = start_app(config, address=None)
    try:
        print(f"[2/3] HTTP path ({args.requests} requests)", flush=True)
        http, grpc_samples, server_e2e = [], [], []
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0}
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(args.requests + 3):
                start = time.perf_counter()
                response = client.post("/v1/completions", json=body)
                elapsed = time.perf_counter() - start
                response.raise_for_status()
                if i >= 3:
                    http.append(elapsed)
                    server_e2e.append(response.json()["timings"]["e2e_ms"] / 1e3)
        print(f"[3/3] gRPC path ({args.requests} requests)", flush=True)
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
    print(f"  HTTP through ingress  : {_median_ms(http)}  -> adds "
          f"{(statistics.median(http) - base) * 1e3:.2f} ms")
    print(f"  gRPC through ingress  : {_median_ms(grpc_samples)}  -> adds "
          f"{(statistics.median(grpc_samples) - base) * 1e3:.2f} ms")
    print(f"  (ingress-measured e2e : {_median_ms(server_e2e)}; the rest of the HTTP figure is "
          "the client and Serve's HTTP proxy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
