"""Router overhead: what the ingress path adds to a one-token request, against the engine alone.

Same tiny model, same prompt, sequential requests (no queueing), medians:
  engine   - vLLM AsyncLLM called in this process (what a bare engine costs);
  vllm     - POST /v1/completions to vLLM's own OpenAI server (one process, same engine
             settings): what a user of plain vLLM pays for HTTP;
  http     - POST /v1/completions to the ingress (direct ingress), which calls the replica the
             scheduler chose (a direct call, runtime/direct_calls.py);
  grpc     - the gRPC API's Generate, same path.
The engine stays up for the whole run and every request of a path is paired with one to the
engine (one after the other), so both see the machine in the same state: the engine alone
took 7 to 15 ms from one minute to the next on two shared cores, as much as the difference
measured. The added latency is the path's median less the engine's over the same minutes.
Every engine computes on the same number of threads (`--threads`, default: the cores this
process may use): Ray gives a replica's process OMP_NUM_THREADS = its num_cpus (1 for
num_cpus 0), one thread against the engine alone's and vLLM's server's two on two cores
(about 1.4 ms of a one-token request here), unless `engine.cpu_threads` says otherwise.
The HTTP path's median is then split with the responses' own `timings`: the engine
(prefill_queue + prefill_compute as the replica reports them: for a local prefill, the
decode replica's wall time from handing the prompt to its engine to the first token; for a
prefill replica, the engine's own queue and compute timestamps, without its inter-process
hops), the ingress around it (its end-to-end less that: the scheduler, the calls to the
replica and back, what the replica does around its engine), and the HTTP server and client
(the rest). With both engines idle, whether a request runs
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.tiny_model import DEFAULT_MODEL_DIR


def _median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e3:7.2f} ms (p10 {_pct(samples, 10):.2f}, " \
           f"p90 {_pct(samples, 90):.2f})"


def _pct(samples: list[float], q: int) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, len(ordered) * q // 100)] * 1e3


class _EngineAlone:
    """vLLM AsyncLLM in this process, kept for the whole run: every request of a path is
    paired with one to it, so both see the machine in the same state (its speed drifts by
    several ms between minutes on two shared cores)."""

    def __init__(self, model: Path, prompt_ids: list[int], threads: int) -> None:
        from runtime.engine_config import EngineConfig
        from runtime.engines import build_engine
        from runtime.requests import SamplingSpec

        self.engine = build_engine(EngineConfig(model=str(model), kv_cache_bytes=256 << 20,
                                                cpu_threads=threads), "colocated")
        self.prompt_ids = prompt_ids
        self.params = SamplingSpec(max_tokens=1).to_vllm()
        self.loop = asyncio.new_event_loop()
        self.count = 0

    def once(self) -> float:
        from runtime.engines import token_prompt

        async def request() -> float:
            start = time.perf_counter()
            async for _ in self.engine.generate(token_prompt(self.prompt_ids),
                                                self.params, request_id=f"direct-{self.count}"):
                pass
            return time.perf_counter() - start

        self.count += 1
        return self.loop.run_until_complete(request())

    def close(self) -> None:
        self.engine.shutdown()
        self.loop.close()


def _paired(engine: _EngineAlone, call: Callable[[], float],
            n: int) -> tuple[list[float], list[float]]:
    """(the path's samples, the engine alone's), one request to each in turn, after 3 of each
    to warm up."""
    path, alone = [], []
    for i in range(n + 3):
        engine_s, path_s = engine.once(), call()
        if i >= 3:
            alone.append(engine_s)
            path.append(path_s)
    return path, alone


def _http_call(client: Any, body: dict[str, object],
               timings: list[dict[str, Any]] | None = None) -> Callable[[], float]:
    def call() -> float:
        start = time.perf_counter()
        response = client.post("/v1/completions", json=body)
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        if timings is not None:
            phases = response.json()["timings"]
            timings.append({"e2e": phases["e2e_ms"] / 1e3,
                            "engine": (phases["prefill_queue_ms"]
                                       + phases["prefill_compute_ms"]) / 1e3,
                            "scheduler": phases["scheduler_queue_ms"] / 1e3,
                            "mode": phases["mode"]})
        return elapsed
    return call


def _vllm_samples(model: Path, body: dict[str, object], n: int, engine: _EngineAlone,
                  threads: int) -> tuple[list[float], list[float]]:
    """vLLM's own OpenAI server, started here with the engine settings of the other paths."""
    import httpx

    from runtime.engine_config import EngineConfig
    from runtime.engines import free_port

    settings = EngineConfig(model=str(model), kv_cache_bytes=256 << 20)
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
            "--dtype", settings.dtype, "--block-size", str(settings.block_size),
            "--max-model-len", str(settings.max_model_len),
            "--max-num-seqs", str(settings.max_num_seqs),
            "--kv-cache-memory-bytes", str(settings.kv_cache_bytes), "--enforce-eager",
            "--disable-uvicorn-access-log", "--disable-log-stats"]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING",
                                   "OMP_NUM_THREADS": str(threads)})
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
        with httpx.Client(base_url=url, timeout=60) as client:
            return _paired(engine, _http_call(client, body), n)
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
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of every engine's tensor ops (default: the cores this "
                        "process may use)")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")

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

    import httpx

    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    print("[1/4] the engine alone, kept for the run: each request below is paired with one "
          "to it", flush=True)
    engine = _EngineAlone(model, prompt_ids, args.threads)
    try:
        print(f"[2/4] vLLM's own OpenAI server ({args.requests} requests)", flush=True)
        vllm = _vllm_samples(model, body, args.requests, engine, args.threads)

        config = AppConfig.model_validate({
            "engine": {"model": str(model), "kv_cache_bytes": 256 << 20,
                       "cpu_threads": args.threads},
            "prefill": {"num_cpus": 0}, "decode": {"num_cpus": 0},
            "server": {"http_port": free_port(), "grpc_port": free_port(),
                       "served_model_name": "tiny"},
        })
        url = start_app(config, address=None)
        try:
            print(f"[3/4] HTTP path ({args.requests} requests)", flush=True)
            server: list[dict[str, Any]] = []
            with httpx.Client(base_url=url, timeout=60) as client:
                http = _paired(engine, _http_call(client, body, server), args.requests)
            del server[:len(server) - args.requests]  # the warm-up's
            print(f"[4/4] gRPC path ({args.requests} requests)", flush=True)
            endpoint = f"{config.server.host}:{config.server.grpc_port}"
            with grpc.insecure_channel(endpoint) as channel:
                stub = pb_grpc.InferenceStub(channel)
                request = pb.GenerateRequest(model="tiny", prompt=prompt, max_tokens=1)

                def grpc_call() -> float:
                    start = time.perf_counter()
                    list(stub.Generate(request, timeout=60))
                    return time.perf_counter() - start

                grpc_samples = _paired(engine, grpc_call, args.requests)
        finally:
            stop_app(config)
    finally:
        engine.close()

    print(f"\none-token request, {len(prompt_ids)}-token prompt, every engine on "
          f"{args.threads} threads, medians of {args.requests}; "
          "'adds' is the path's median less that of the engine alone over the same minutes:")
    for name, (path, alone) in (("vLLM's OpenAI server", vllm), ("HTTP through ingress", http),
                                ("gRPC through ingress", grpc_samples)):
        print(f"  {name:<22}: {_median_ms(path)}  -> adds "
              f"{(statistics.median(path) - statistics.median(alone)) * 1e3:.2f} ms "
              f"(engine alone {statistics.median(alone) * 1e3:.2f} ms)")
    http_path, http_alone = http
    server_e2e = [t["e2e"] for t in server]
    in_replica = [t["engine"] for t in server]
    around = [t["e2e"] - t["engine"] for t in server]
    outside = [client - t["e2e"] for client, t in zip(http_path, server, strict=True)]
    print(f"  (ingress-measured e2e : {_median_ms(server_e2e)})")
    modes = ", ".join(f"{mode} {count}" for mode, count in
                      Counter(t["mode"] for t in server).most_common())
    print(f"\nthe HTTP path, medians of each part (requests ran {modes}):")
    print(f"  engine, as reported   : {_median_ms(in_replica)}  (engine alone "
          f"{statistics.median(http_alone) * 1e3:.2f} ms)")
    print(f"  ingress around it     : {_median_ms(around)}  (of which scheduler queue "
          f"{statistics.median(t['scheduler'] for t in server) * 1e3:.2f} ms)")
    print(f"  HTTP server and client: {_median_ms(outside)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
