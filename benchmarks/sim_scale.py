"""Simulator speed: a large request stream over a large cluster, with the real policy.

    python -m benchmarks.sim_scale [--requests 1000000] [--replicas 128]
"""

from __future__ import annotations

import argparse
import sys
import time

from runtime.scheduler.sim.cost_model import H100X8, LLAMA3_70B, CostModel
from runtime.scheduler.sim.plan import long_prefill_share, policy_config
from runtime.scheduler.sim.report import summarize
from runtime.scheduler.sim.simulator import ClusterSpec, simulate
from runtime.scheduler.sim.workload import mixed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--replicas", type=int, default=128)
    parser.add_argument("--mode", choices=["colocated", "static", "policy"], default="policy")
    args = parser.parse_args(argv)
    cost = CostModel(LLAMA3_70B, H100X8)
    rate = 3.5 * args.replicas  # about 90% of what the cluster serves at these SLOs
    trace = mixed(args.requests, rate_per_s=rate, long_fraction=0.02, seed=3)
    num_prefill = args.replicas * 3 // 4
    num_long = max(1, round(long_prefill_share(cost, trace[:20000], 16384) * num_prefill))
    spec = ClusterSpec(args.mode, num_prefill, args.replicas - num_prefill,  # type: ignore[arg-type]
                       num_long_prefill=num_long, policy=policy_config(cost, 16384))
    print(f"simulating {args.requests:,} requests at {rate:.0f}/s over {args.replicas} replicas "
          f"({spec.mode}, {num_prefill}:{args.replicas - num_prefill}, {num_long} long)",
          flush=True)
    start = time.perf_counter()
    run = simulate(spec, cost, trace)
    elapsed = time.perf_counter() - start
    summary = summarize(run, 16384, 300, 50, lambda n: 1e3 * cost.prefill_s(n))
    print(f"simulated {trace[-1].arrival_s:.0f} s of traffic in {elapsed:.1f} s wall "
          f"({args.requests / elapsed:,.0f} requests/s)")
    print(f"goodput {summary.goodput_rps:.0f}/s of {summary.throughput_rps:.0f}/s; short TTFT p99 "
          f"{summary.short_ttft_p99_ms:.0f} ms; TPOT p99 {summary.tpot_p99_ms:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
