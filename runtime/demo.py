"""The README's main job: prompts served disaggregated on the tiny model, timings printed.

  1. Generate the tiny model (once; cached).
  2. Start local Ray and the app: one prefill replica, one decode replica (vLLM on the CPU,
     joined by the KV transport) and the ingress (`run_ray_demo`); or, with --engines-only,
     the two engines in this process without Ray (`run_demo`).
  3. Send a mix of short and long prompts through the OpenAI-compatible HTTP API; print each
     one's output and its latency split by phase.
  4. Check both pools hold nothing afterwards, and shut down.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from decode_workers.worker import DecodeWorker
from prefill_workers.worker import PrefillWorker
from runtime.engine_config import EngineConfig, TransferConfig
from runtime.engines import build_engine
from runtime.pipeline import DisaggPipeline, PhaseTimings
from runtime.requests import GenerateRequest, SamplingSpec

DEMO_PROMPTS = (
    "The capital of France is",
    "Disaggregated serving splits prefill and decode because",
    "A long document follows. " + "The quick brown fox jumps over the lazy dog. " * 60,
    "Summarize: " + "Prefill is compute-bound while decode is memory-bandwidth-bound. " * 40,
    "Hi",
)

COLUMNS = (
    ("prompt", 7), ("out", 4), ("prefill_q", 10), ("prefill", 9), ("kv_ms", 7), ("kv_MiB", 7),
    ("dec_q", 7), ("ttft", 8), ("tpot", 7), ("e2e", 8), ("loaded", 7), ("recomp", 7),
)


def _format_row(t: PhaseTimings) -> str:
    values = (
        t.num_prompt_tokens, t.num_output_tokens, f"{t.prefill_queue_ms:.1f}",
        f"{t.prefill_compute_ms:.1f}", f"{t.kv_transfer_ms:.1f}",
        f"{t.kv_transfer_bytes / (1 << 20):.2f}", f"{t.decode_queue_ms:.1f}",
        f"{t.ttft_ms:.1f}", f"{t.tpot_ms:.1f}", f"{t.e2e_ms:.1f}", t.num_loaded_tokens,
        t.num_decode_computed_prompt_tokens,
    )
    return " ".join(f"{v!s:>{w}}" for v, (_, w) in zip(values, COLUMNS, strict=True))


async def run_demo(model_dir: Path, max_tokens: int, kv_cache_bytes: int) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    engine_config = EngineConfig(model=str(model_dir), kv_cache_bytes=kv_cache_bytes)
    transfer = TransferConfig()
    print("[demo] starting the prefill engine and the decode engine (about 30-60 s each)",
          flush=True)
    start = time.perf_counter()
    prefill = PrefillWorker(build_engine(engine_config, "prefill", transfer),
                            transfer.auth_token.get_secret_value())
    decode = DecodeWorker(build_engine(engine_config, "decode", transfer),
                          engine_config.block_size)
    print(f"[demo] engines up in {time.perf_counter() - start:.0f} s", flush=True)
    pipeline = DisaggPipeline(prefill, decode)
    sampling = SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    try:
        requests = [
            GenerateRequest(f"demo-{i}", tuple(tokenizer(text)["input_ids"]), sampling)
            for i, text in enumerate(DEMO_PROMPTS)
        ]
        completions = [await pipeline.generate(request) for request in requests]
        for request, completion, text in zip(requests, completions, DEMO_PROMPTS, strict=True):
            output = tokenizer.decode(list(completion.token_ids))
            print(f"\n[{request.request_id}] prompt ({len(request.prompt_token_ids)} tokens): "
                  f"{text[:60]!r}{'...' if len(text) > 60 else ''}")
            print(f"  output: {output!r}")
        print("\nlatency split per request (ms; kv_MiB = KV bytes moved; loaded = prompt tokens "
              "loaded over the transport; recomp = prompt tokens the decode engine computed)")
        print(" ".join(f"{name:>{w}}" for name, w in COLUMNS))
        for completion in completions:
            print(_format_row(completion.timings))
        produced, consumed = await prefill.kv_stats(), await decode.kv_stats()
        for _ in range(50):
            if produced.num_leases == 0 and consumed.num_loads_in_flight == 0:
                break
            await asyncio.sleep(0.1)
            produced, consumed = await prefill.kv_stats(), await decode.kv_stats()
        print(f"\n[demo] after the run: producer holds {produced.num_leased_blocks} leased blocks, "
              f"consumer has {consumed.num_loads_in_flight} loads pending, "
              f"{consumed.num_loads_done} loads done, {consumed.num_loads_failed} failed")
        return 0 if produced.num_leases == 0 and consumed.num_loads_in_flight == 0 else 1
    finally:
        prefill.shutdown()
        decode.shutdown()


def _print_table(rows: list[PhaseTimings]) -> None:
    print("\nlatency split per request (ms; kv_MiB = KV bytes moved; loaded = prompt tokens "
          "loaded over the transport; recomp = prompt tokens the decode engine computed)")
    print(" ".join(f"{name:>{w}}" for name, w in COLUMNS) + "  lane   mode")
    for timings in rows:
        print(_format_row(timings) + f"  {timings.lane:<6} {timings.mode}")


def run_ray_demo(model_dir: Path, max_tokens: int, kv_cache_bytes: int) -> int:
    import httpx

    from runtime.app_config import AppConfig
    from runtime.engines import free_port
    from runtime.serve_cli import start_app, stop_app

    config = AppConfig.model_validate({
        "engine": {"model": str(model_dir), "kv_cache_bytes": kv_cache_bytes},
        "prefill": {"num_cpus": 0}, "decode": {"num_cpus": 0},
        "scheduler": {"long_prompt_tokens": 1024},
        "server": {"http_port": free_port(), "grpc_port": 0, "served_model_name": "tiny"},
    })
    print("[demo] starting local Ray with one prefill replica, one decode replica and the "
          "ingress", flush=True)
    url = start_app(config, address=None)
    rows: list[PhaseTimings] = []
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            for i, text in enumerate(DEMO_PROMPTS):
                body = {"model": "tiny", "prompt": text, "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": True}
                response = client.post("/v1/completions", json=body)
                response.raise_for_status()
                result = response.json()
                timings = result["timings"]
                timings.pop("phases_ms", None)
                rows.append(PhaseTimings(**timings))
                print(f"\n[request {i}] prompt ({result['usage']['prompt_tokens']} tokens): "
                      f"{text[:60]!r}{'...' if len(text) > 60 else ''}")
                print(f"  output: {result['choices'][0]['text']!r}")
            _print_table(rows)
            status = client.get("/v1/disagg/status").json()
        leases = status["prefill"]["kv"]["num_leases"]
        pending = status["decode"]["kv"]["num_loads_in_flight"]
        print(f"\n[demo] after the run: prefill holds {leases} leases, decode has {pending} "
              "loads pending")
        return 0 if leases == 0 and pending == 0 else 1
    finally:
        print("[demo] shutting down", flush=True)
        stop_app(config)
