"""Cost of one scheduling decision at cluster scale.

    python -m benchmarks.scheduler_bench [--replicas 1000] [--decisions 20000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from runtime.scheduler.loads import DecodeTable, PrefillTable
from runtime.scheduler.policy import GlobalScheduler, PolicyConfig
from runtime.scheduler.prefill_model import PrefillModel
from runtime.scheduler.types import Decision, DecodeLoad, PrefillLoad, RequestInfo


def build(num_replicas: int, seed: int = 0) -> GlobalScheduler:
    rng = random.Random(seed)
    num_long = max(1, num_replicas // 4)
    lanes = ["long"] * num_long + ["short"] * (num_replicas - num_long)
    model = PrefillModel(2.0, 0.02, 2e-6)
    prefill = PrefillTable([f"p{i}" for i in range(num_replicas)], lanes, model)  # type: ignore[arg-type]
    decode = DecodeTable([f"d{i}" for i in range(num_replicas)], [8192] * num_replicas, 16,
                         256, model)
    for i, lane in enumerate(lanes):
        prefill.report(PrefillLoad(f"p{i}", lane, 0, 0.0))  # type: ignore[arg-type]
        prefill.work.book(i, f"warm-p{i}", lane, rng.randint(0, 50_000), 0.0)  # type: ignore[arg-type]
        decode.report(DecodeLoad(f"d{i}", rng.randint(0, 8192), 16, rng.randint(0, 255), 256,
                                 0.0))
        # live replicas report their engine's decode step (s0 + s1 x sequences ms)
        for table in (prefill, decode):
            table.report_decode_step(i, (rng.uniform(8, 12), rng.uniform(0.1, 0.3)))
    return GlobalScheduler(PolicyConfig(local_max_prompt_tokens=512), prefill, decode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=1000, help="replicas per pool")
    parser.add_argument("--decisions", type=int, default=20_000)
    args = parser.parse_args(argv)
    sched = build(args.replicas)
    rng = random.Random(1)
    samples = []
    for i in range(args.decisions):
        request = RequestInfo(f"r{i}", rng.choice([200, 800, 3000, 40_000]), 256, 1.0)
        start = time.perf_counter()
        decision = sched.decide(request, 1.0)
        samples.append(time.perf_counter() - start)
        if isinstance(decision, Decision):  # keep the cluster from filling up
            sched.first_token(decision, request.request_id)
            sched.decode.released(decision.decode_replica, sched.decode.blocks_for(
                request.prompt_len + request.max_tokens), request.max_tokens)
    samples.sort()
    print(f"{args.replicas} prefill + {args.replicas} decode replicas, {args.decisions} "
          f"decisions: median {statistics.median(samples) * 1e6:.1f} us, "
          f"p99 {samples[int(0.99 * len(samples))] * 1e6:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
