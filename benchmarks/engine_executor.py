"""Where vLLM runs the model on a CPU: in a worker process of its own (executor "mp", what
vLLM's CPU platform chooses) or in the engine core process ("uni", `engine.executor`).

    python -m benchmarks.engine_executor [--streams 8] [--tokens 256] [--prompt 500]

With "mp" the engine core waits for every step's result in a busy loop (vLLM's shared-memory
queue yields the CPU with sched_yield and only sleeps after 1 s without a result), so a busy
engine keeps a second core busy too. On a machine with one core per engine that core is the
other engine's. This runs, for each executor in a fresh process, the bench-compare setup of two
engines pinned to one core each (`engine.cpu_threads_bind`): engine 0 decodes `--streams`
streams of `--tokens` tokens while engine 1 prefills `--prompt`-token prompts one after
another; it prints engine 0's decode tokens/s, engine 1's prefill time alone and beside the
decoding engine (medians), and the CPU seconds the engines' processes used in that window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import psutil

from benchmarks.compare import resolve_model

SETTINGS = {"max_model_len": 8448, "max_num_seqs": 32, "max_num_batched_tokens": 2048,
            "kv_cache_bytes": 512 << 20, "block_size": 128}


def _measure(executor: str, model: str, streams: int, tokens: int, prompt: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from runtime.engine_config import EngineConfig
    from runtime.engines import build_engine

    engines = [build_engine(EngineConfig(model=model, cpu_threads_bind=str(core),
                                         executor=executor, **SETTINGS), "colocated")
               for core in (0, 1)]
    decoder, prefiller = engines

    async def generate(engine: Any, prompt_ids: list[int], max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                                temperature=0)
        started, first = time.perf_counter(), None
        async for _ in engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params,
                                       uuid.uuid4().hex):
            first = first or time.perf_counter() - started
        return first or 0.0

    def prompt_ids(seed: int, n: int) -> list[int]:
        return [5 + (seed * 31 + j * 7) % 200 for j in range(n)]

    async def prefills(count: int, seed: int) -> list[float]:
        return [1e3 * await generate(prefiller, prompt_ids(seed + k, prompt), 1)
                for k in range(count)]

    async def run() -> dict:
        await asyncio.gather(generate(decoder, prompt_ids(0, 64), 4), prefills(2, 1))
        alone = await prefills(5, 100)
        procs = [p for p in psutil.Process().children(recursive=True)
                 if p.name().startswith("VLLM::")]
        cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        started = time.perf_counter()
        decode = asyncio.gather(*(generate(decoder, prompt_ids(1000 + i, 64), tokens)
                                  for i in range(streams)))
        beside: list[float] = []
        while not decode.done():
            beside += await prefills(1, 2000 + len(beside))
        await decode
        took = time.perf_counter() - started
        cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
        return {"executor": executor, "engine_processes": len(procs),
                "decode_tokens_per_s": streams * tokens / took,
                "prefill_alone_ms": statistics.median(alone),
                "prefill_beside_decode_ms": statistics.median(beside),
                "num_prefills_beside": len(beside),
                "engine_cpu_s": cpu, "window_s": took}

    try:
        return asyncio.run(run())
    finally:
        for engine in engines:
            engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--streams", type=int, default=8, help="decoding streams on engine 0")
    p.add_argument("--tokens", type=int, default=256, help="tokens each stream decodes")
    p.add_argument("--prompt", type=int, default=500, help="prompt tokens of engine 1's prefills")
    p.add_argument("--model", help="checkpoint (default: the tiny model)")
    p.add_argument("--one", choices=("mp", "uni"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    model = str(resolve_model(args.model))
    if args.one:
        print(json.dumps(_measure(args.one, model, args.streams, args.tokens, args.prompt)))
        return 0
    print(f"{'executor':>8} {'engine procs':>12} {'decode tok/s':>12} {'prefill alone':>13} "
          f"{'beside decode':>13} {'engine CPU-s / s':>16}")
    for executor in ("mp", "uni"):
        print(f"[engine_executor] {executor}: starting two engines (about a minute)",
              file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, "-m", "benchmarks.engine_executor", "--one",
                              executor, "--model", model, "--streams", str(args.streams),
                              "--tokens", str(args.tokens), "--prompt", str(args.prompt)],
                             capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"error: the {executor} run failed (exit {out.returncode})")
        r = json.loads(lines[-1])
        print(f"{executor:>8} {r['engine_processes']:>12} {r['decode_tokens_per_s']:>12.0f} "
              f"{r['prefill_alone_ms']:>10.1f} ms {r['prefill_beside_decode_ms']:>10.1f} ms "
              f"{r['engine_cpu_s'] / r['window_s']:>16.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
