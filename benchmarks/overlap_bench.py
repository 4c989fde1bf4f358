"""Exposed KV transfer of a long prompt, per transport, on real vLLM CPU engines.

One prefill engine (producer; serves both transports) and one decode engine per payload path:
bulk TCP, gRPC streams, and the nccl transport in gloo mode. For each prompt length, path and
overlap setting (off: the decode worker pulls after the prefill; on: it prefetches the blocks
layer by layer while the prefill computes them) it runs fresh prompts through the
disaggregated pipeline and prints the medians of:
  prefill ms       - the prefill engine's compute for the prompt,
  transfer ms      - how long the payload was moving (TransferStats.transfer_ms: the pull less
                     the producer's wait for compute, plus the copy out of staging),
  exposed ms       - what the decode request waited for its KV (kv_transfer_exposed_ms),
  hidden           - 1 - exposed / transfer (the share hidden behind compute).

    python -m benchmarks.overlap_bench [--lengths 4000 8000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from decode_workers.worker import DecodeWorker
from prefill_workers.worker import PrefillWorker
from runtime.engine_config import EngineConfig, TransferConfig
from runtime.engines import build_engine
from runtime.pipeline import DisaggPipeline, PhaseTimings
from runtime.requests import GenerateRequest, SamplingSpec
from runtime.tiny_model import make_tiny_model

BLOCK_SIZE = 128
PATHS = ("tcp", "grpc", "nccl")


def _transfers() -> dict[str, TransferConfig]:
    base = TransferConfig(pull_timeout_s=60.0, overlap=True)
    nccl = TransferConfig.model_validate(
        {**base.model_dump(), "auth_token": base.auth_token, "transport": "nccl",
         "gloo_test_mode": True}
    )
    return {
        "tcp": base,
        "grpc": base.model_copy(update={"data_channel": "grpc", "num_streams": 2}),
        "nccl": nccl,
    }


def _prompt(length: int, seed: int) -> tuple[int, ...]:
    import random

    rng = random.Random(seed * 7919 + length)
    return tuple(rng.randint(3, 258) for _ in range(length))


async def _run(model: Path, lengths: list[int], repeats: int) -> list[str]:
    config = EngineConfig(model=str(model), block_size=BLOCK_SIZE, kv_cache_bytes=512 << 20,
                          max_model_len=max(lengths) + 64, max_num_seqs=4)
    transfers = _transfers()
    prefill = PrefillWorker(build_engine(config, "prefill", transfers["nccl"]),
                            transfers["nccl"].auth_token.get_secret_value())
    decoders = {path: DecodeWorker(build_engine(config, "decode", transfers[path]), BLOCK_SIZE)
                for path in PATHS}
    rows = []
    try:
        seed = 0
        for length in lengths:
            for path in PATHS:
                for overlap in (False, True):
                    pipeline = DisaggPipeline(prefill, decoders[path], overlap=overlap)
                    timings: list[PhaseTimings] = []
                    for i in range(repeats + 1):  # the first run warms the path up
                        seed += 1
                        request = GenerateRequest(f"bench-{path}-{overlap}-{length}-{i}",
                                                  _prompt(length, seed),
                                                  SamplingSpec(max_tokens=2, ignore_eos=True))
                        completion = await pipeline.generate(request)
                        t = completion.timings
                        assert t.num_loaded_tokens == length, t
                        assert t.kv_transfer_overlapped == overlap, t
                        if i:
                            timings.append(t)
                    rows.append(_row(path, overlap, length, timings))
    finally:
        for engine in [prefill.engine, *(d.engine for d in decoders.values())]:
            engine.shutdown()
    return rows


def _row(path: str, overlap: bool, length: int, timings: list[PhaseTimings]) -> str:
    prefill_ms = statistics.median(t.prefill_compute_ms for t in timings)
    transfer_ms = statistics.median(t.kv_transfer_ms for t in timings)
    exposed_ms = statistics.median(t.kv_transfer_exposed_ms for t in timings)
    mib = timings[0].kv_transfer_bytes / 2**20
    hidden = 1 - exposed_ms / transfer_ms if transfer_ms else 0.0
    mode = "on" if overlap else "off"
    return (f"| {path:5} | {mode:7} | {length:6} | {mib:7.1f} | {prefill_ms:10.1f} "
            f"| {transfer_ms:11.1f} | {exposed_ms:10.1f} | {hidden:6.0%} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4000, 8000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp))
        rows = asyncio.run(_run(model, args.lengths, args.repeats))
    print("| path  | overlap | prompt |   MiB   | prefill ms | transfer ms | exposed ms | hidden |")
    print("|-------|---------|--------|---------|------------|-------------|------------|--------|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
