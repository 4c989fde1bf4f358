"""Simulated study: Llama-3-70B on 8xH100 replicas (published hardware figures), a mixed
workload (98% short chat, 2% prompts of 32K-128K tokens), colocated vs static disaggregation vs
the disagg policy, each at its best prefill:decode split for the rate.

    python -m benchmarks.sim_study [--replicas 16] [--rates 30 45 60 75] [--requests 6000]

Writes benchmarks/results/sim_study.md and benchmarks/results/sim_study.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.scheduler.sim.cost_model import H100X8, LLAMA3_70B, CostModel
from runtime.scheduler.sim.plan import PlanRow, plan
from runtime.scheduler.sim.workload import mixed

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("colocated", "static", "policy")


def best_per_mode(rows: list[PlanRow]) -> dict[str, PlanRow]:
    best: dict[str, PlanRow] = {}
    for row in rows:  # sorted by goodput, best first
        best.setdefault(row.mode, row)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--rates", type=float, nargs="+", default=[30, 45, 60, 75])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--ttft-slo-ms", type=float, default=300.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cost = CostModel(LLAMA3_70B, H100X8)
    results: dict[float, dict[str, PlanRow]] = {}
    for rate in args.rates:
        print(f"[study] rate {rate:g}/s: simulating every split", flush=True)
        trace = mixed(args.requests, rate_per_s=rate, long_fraction=0.02, seed=2)
        results[rate] = best_per_mode(plan(cost, trace, args.replicas, args.ttft_slo_ms,
                                           args.tpot_slo_ms))
    lines = [
        f"Llama-3-70B, {args.replicas} replicas of 8xH100 (989 TFLOP/s bf16 and 3.35 TB/s per "
        "GPU, 50 GB/s per GPU RDMA), 98% chat prompts (~600 tokens, ~200 out), 2% of 32K-128K "
        f"tokens; SLOs: TTFT {args.ttft_slo_ms:g} ms (+3x the prompt's unloaded prefill), TPOT "
        f"{args.tpot_slo_ms:g} ms; {args.requests} requests per rate; each mode at its best "
        "prefill:decode split (P:D, long-lane prefill replicas in brackets).",
        "",
        "| rate/s | mode | P:D | goodput/s | short TTFT p50 / p99 ms | TPOT p50 / p99 ms "
        "| local |",
        "|---|---|---|---|---|---|---|",
    ]
    for rate, best in results.items():
        for mode in MODES:
            row = best[mode]
            s = row.summary
            split = "all" if mode == "colocated" else f"{row.num_prefill}:{row.num_decode}" + (
                f" ({row.num_long_prefill})" if mode == "policy" else "")
            lines.append(
                f"| {rate:g} | {mode} | {split} | {s.goodput_rps:.1f} | "
                f"{s.short_ttft_p50_ms:.0f} / {s.short_ttft_p99_ms:.0f} | "
                f"{s.tpot_p50_ms:.1f} / {s.tpot_p99_ms:.1f} | {s.local_fraction:.0%} |")
    args.out.mkdir(parents=True, exist_ok=True)
    table = "\n".join(lines) + "\n"
    (args.out / "sim_study.md").write_text(table)
    print("\n" + table)
    _plot(results, args.out / "sim_study.png")
    print(f"wrote {args.out / 'sim_study.md'} and {args.out / 'sim_study.png'}")
    return 0


def _plot(results: dict[float, dict[str, PlanRow]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        left.plot(rates, [results[r][mode].summary.short_ttft_p99_ms for r in rates],
                  marker="o", label=mode)
        right.plot(rates, [results[r][mode].summary.goodput_rps for r in rates], marker="o",
                   label=mode)
    left.set(xlabel="request rate (1/s)", ylabel="short-request p99 TTFT (ms)", yscale="log",
             title="Short requests' p99 TTFT")
    right.set(xlabel="request rate (1/s)", ylabel="goodput (requests/s meeting both SLOs)",
              title="Goodput")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Llama-3-70B on 8xH100 replicas, simulated")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
