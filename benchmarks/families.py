"""One table per workload family from `disagg bench compare` results, with the targets' ratios.

    python -m benchmarks.families benchmarks/results/compare-*-quick

For every run directory (its results.json) and rate: p99 and p50 TTFT of short requests per
target, whether plain vLLM shows head-of-line blocking (its short p99 > 3x its p50), disagg's
short p99 against vLLM's (target: <= 0.5x with head-of-line blocking, <= 1.2x without),
goodput against vLLM's (>= 0.95x), long p99 TTFT against colocated's (<= 1.1x; with the
mean's ratio and the number of long requests beside it: in a quick run of `mixed` there are
7-10, so the p99 is about their slowest), and CPU milliseconds per output token per target.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

TARGETS = ("disagg", "colocated", "vllm", "rayllm")


def _get(run: dict[str, Any] | None, cls: str, metric: str, pct: str) -> float:
    if run is None:
        return math.nan
    value = run["classes"][cls][metric].get(pct)
    return float("nan") if value is None else float(value)


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def _ratio(a: float, b: float) -> str:
    return "-" if math.isnan(a) or math.isnan(b) or b <= 0 else f"{a / b:.2f}x"


def family_table(results: dict[str, Any]) -> list[str]:
    runs = results["summaries"]
    lines = ["| rate | short p99 TTFT ms disagg / colocated / vllm / rayllm | vllm HOL "
             "(p99/p50) | disagg / vllm short p99 | goodput disagg / vllm | long TTFT disagg / "
             "colocated: p99 (mean), n | CPU ms/token disagg / colocated / vllm / rayllm |",
             "|---|---|---|---|---|---|---|"]
    for rate in sorted({r["rate_per_s"] for r in runs}):
        by = {r["target"]: r for r in runs if r["rate_per_s"] == rate}
        p99 = {t: _get(by.get(t), "short", "ttft_ms", "p99") for t in TARGETS}
        v50 = _get(by.get("vllm"), "short", "ttft_ms", "p50")
        hol = p99["vllm"] / v50 if v50 and not math.isnan(v50) else math.nan
        goodput = {t: float(by[t]["goodput_per_s"]) if t in by else math.nan for t in TARGETS}
        long_p99 = {t: _get(by.get(t), "long", "ttft_ms", "p99") for t in TARGETS}
        long_mean = {t: float(by[t]["classes"]["long"].get("mean_ttft_ms", math.nan))
                     if t in by else math.nan for t in TARGETS}
        num_long = by["disagg"]["classes"]["long"].get("num_requests", "-") \
            if "disagg" in by else "-"
        cpu = {t: float(by[t].get("cpu_ms_per_token", math.nan)) if t in by else math.nan
               for t in TARGETS}
        lines.append(
            f"| {rate:g}/s | {' / '.join(_ms(p99[t]) for t in TARGETS)} | "
            f"{'-' if math.isnan(hol) else f'{hol:.1f}'} | "
            f"{_ratio(p99['disagg'], p99['vllm'])} | "
            f"{_ratio(goodput['disagg'], goodput['vllm'])} | "
            f"{_ratio(long_p99['disagg'], long_p99['colocated'])} "
            f"({_ratio(long_mean['disagg'], long_mean['colocated'])}), n {num_long} | "
            f"{' / '.join('-' if math.isnan(cpu[t]) else f'{cpu[t]:.2f}' for t in TARGETS)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print(__doc__)
        return 2
    for path in paths:
        results_file = path / "results.json"
        if not results_file.exists():
            print(f"{path}: no results.json", file=sys.stderr)
            continue
        results = json.loads(results_file.read_text())
        print(f"\n**{path.name}** ({results['notes'][0]})\n")
        print("\n".join(family_table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
