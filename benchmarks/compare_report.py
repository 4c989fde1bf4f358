"""The comparison's outputs: a Markdown table and PNG plots, from the run summaries."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.cpu_usage import ROLES
from benchmarks.loadgen import RequestRecord
from benchmarks.summary import COST_FIELDS, PHASES, PROMPT_BUCKETS, SLO, RunSummary

BASELINE = "colocated"


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def _ratio(value: float, base: float) -> str:
    if math.isnan(value) or math.isnan(base) or base <= 0:
        return "-"
    return f"{value / base:.2f}x"


def markdown(title: str, runs: list[RunSummary], slo: SLO, notes: list[str]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes]
    lines += [f"- SLOs for goodput: TTFT <= {slo.ttft_ms:.0f} ms and TPOT <= {slo.tpot_ms:.0f} "
              "ms; ratios are to `colocated` in the same run at the same rate.", ""]
    for rate in sorted({r.rate_per_s for r in runs}):
        at_rate = [r for r in runs if r.rate_per_s == rate]
        base = next((r for r in at_rate if r.target == BASELINE), None)
        lines += [f"## {rate:g} requests/s", "",
                  "| target | class | n (err) | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 "
                  "ms | p99 TTFT vs colocated | p99 TPOT vs colocated |",
                  "|---|---|---|---|---|---|---|"]
        for run in at_rate:
            for name in ("short", "long"):
                c = run.classes[name]
                if not c.num_requests:
                    continue
                b = base.classes[name] if base else None
                lines.append(
                    f"| {run.target} | {name} | {c.num_requests} ({c.num_errors}) | "
                    f"{' / '.join(_ms(c.ttft_ms[p]) for p in ('p50', 'p90', 'p99'))} | "
                    f"{' / '.join(_ms(c.tpot_ms[p]) for p in ('p50', 'p90', 'p99'))} | "
                    f"{_ratio(c.ttft_ms['p99'], b.ttft_ms['p99']) if b else '-'} | "
                    f"{_ratio(c.tpot_ms['p99'], b.tpot_ms['p99']) if b else '-'} |")
        lines += ["", "| target | goodput req/s (vs colocated) | SLO met | throughput "
                      "tokens/s | requests/s | duration s |", "|---|---|---|---|---|---|"]
        for run in at_rate:
            a = run.classes["all"]
            lines.append(
                f"| {run.target} | {run.goodput_per_s:.2f} "
                f"({_ratio(run.goodput_per_s, base.goodput_per_s) if base else '-'}) | "
                f"{a.num_slo_met}/{a.num_requests} | {run.throughput_tokens_per_s:.0f} | "
                f"{run.throughput_requests_per_s:.2f} | {run.duration_s:.1f} |")
        lines += ["", "CPU per output token (every process of the target, user + system), and "
                  "CPU seconds by role over the run:", "",
                  "| target | CPU ms/token (vs vllm) | " + " | ".join(ROLES) + " |",
                  "|---|---|" + "---|" * len(ROLES)]
        ref = next((r for r in at_rate if r.target == "vllm"), None)
        for run in at_rate:
            vs = _ratio(run.cpu_ms_per_token, ref.cpu_ms_per_token) if ref else "-"
            lines.append(f"| {run.target} | {run.cpu_ms_per_token:.2f} ({vs}) | "
                         + " | ".join(f"{run.cpu_s_by_role.get(r, 0.0):.1f}" for r in ROLES)
                         + " |")
        costed = [run for run in at_rate if run.cost_per_1k_tokens]
        if costed:
            lines += ["", "What the requests cost per 1,000 output tokens (each engine step "
                      "divided among its requests; engines' idle time not included):", "",
                      "| target | prefill engine-s | decode engine-s | prefill KV block-s | "
                      "decode KV block-s | dollars |", "|---|---|---|---|---|---|"]
            for run in costed:
                name = f"{run.target} (estimated)" if run.cost_estimated else run.target
                lines.append(f"| {name} | " + " | ".join(
                    f"{run.cost_per_1k_tokens[f]:.4g}" if f in run.cost_per_1k_tokens else "n/a"
                    for f in COST_FIELDS) + " |")
            covered = [f"{run.target} {100 * c:.1f}%" for run in costed
                       if (c := run.cost_coverage) is not None]
            if covered:
                lines += ["", "The requests' engine-seconds against the engines' busy time "
                          "over the run (server-reported): " + ", ".join(covered) + "."]
            if any(run.cost_estimated for run in costed):
                lines += ["", "(estimated: from the token arrivals the clients saw, each "
                          "engine step's time divided by the same rule; engine-seconds only, "
                          "benchmarks/timeline_cost.py)"]
            labels = [b[2] for b in PROMPT_BUCKETS]
            lines += ["", "Prefill engine-us per prompt token by prompt length (median; "
                      "rising with length where attention's quadratic term shows):", "",
                      "| target | " + " | ".join(labels) + " |",
                      "|---|" + "---|" * len(labels)]
            for run in costed:
                lines.append(f"| {run.target} | " + " | ".join(
                    f"{run.prefill_us_per_token[b]:.0f}" if b in run.prefill_us_per_token
                    else "-" for b in labels) + " |")
        lines += ["", "Mean server-side phases, ms (what each request waited for, by phase):", "",
                  "| target | class | modes | " + " | ".join(PHASES) + " |",
                  "|---|---|---|" + "---|" * len(PHASES)]
        for run in at_rate:
            for name in ("short", "long"):
                c = run.classes[name]
                if c.phases_ms:
                    modes = ", ".join(f"{m} {n}" for m, n in sorted(c.modes.items()))
                    lines.append(f"| {run.target} | {name} | {modes} | "
                                 + " | ".join(_ms(c.phases_ms[p]) for p in PHASES) + " |")
        lines.append("")
    return "\n".join(lines)


def plots(out_dir: Path, runs: list[RunSummary], records: dict[tuple[str, float], Any],
          long_prompt_tokens: int) -> list[Path]:
    """ttft_cdf_short.png (at the highest rate), phases.png (at the highest rate),
    p99_ttft_vs_rate.png, and cost_vs_prompt.png where a target reports what each request
    cost. records: (target, rate) -> list of RequestRecord."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    top = max(r.rate_per_s for r in runs)
    targets = list(dict.fromkeys(r.target for r in runs))
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for target in targets:
        recs: list[RequestRecord] = records.get((target, top), [])
        ttfts = np.sort([r.ttft_ms for r in recs if r.ttft_ms is not None and not r.error
                         and r.prompt_len < long_prompt_tokens])
        if len(ttfts):
            ax.step(ttfts, np.arange(1, len(ttfts) + 1) / len(ttfts), where="post", label=target)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT of short requests (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"Short-request TTFT CDF at {top:g} req/s")
    ax.grid(True, alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / "ttft_cdf_short.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    bars = [(r.target, name, r.classes[name]) for r in runs if r.rate_per_s == top
            for name in ("short", "long") if r.classes[name].num_requests]
    labels = [f"{t}\n{n}" for t, n, _ in bars]
    bottom = np.zeros(len(bars))
    for phase in (*PHASES, "client_ttft", "client_rest"):
        heights = np.array([_phase_height(c, phase) for _, _, c in bars])
        if heights.any():
            ax.bar(labels, heights, bottom=bottom, label=phase)
            bottom += heights
    ax.set_ylabel("mean ms per request")
    ax.set_title(f"Where the time goes, by phase, at {top:g} req/s\n"
                 "(vllm, rayllm: client-side TTFT and the rest; they report no phases)",
                 fontsize=9)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "phases.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for target in targets:
        points = sorted((r.rate_per_s, r.classes["short"].ttft_ms["p99"]) for r in runs
                        if r.target == target)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=target)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("p99 TTFT of short requests (ms)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / "p99_ttft_vs_rate.png"))
    costed = {t: [r for r in records.get((t, top), []) if not r.error and r.cost is not None]
              for t in targets}
    if any(costed.values()):
        paths.append(_cost_plot(out_dir / "cost_vs_prompt.png", costed, top))
    return paths


def _cost_plot(path: Path, costed: dict[str, list[RequestRecord]], rate: float) -> Path:
    """Each request's prefill and decode engine-seconds against its prompt length."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for target, recs in costed.items():
        if not recs:
            continue
        lengths = [r.prompt_len for r in recs]
        for phase, marker in (("prefill", "o"), ("decode", "x")):
            ax.scatter(lengths, [1e3 * r.cost[f"{phase}_engine_s"] for r in recs if r.cost],
                       marker=marker, s=12, label=f"{target} {phase}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens (log)")
    ax.set_ylabel("engine ms charged to the request (log)")
    ax.set_title(f"Cost per request by phase at {rate:g} req/s", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _phase_height(c: Any, phase: str) -> float:
    if c.phases_ms:
        return float(c.phases_ms.get(phase, 0.0))
    if phase == "client_ttft":
        return 0.0 if math.isnan(c.mean_ttft_ms) else float(c.mean_ttft_ms)
    if phase == "client_rest":
        rest = c.mean_e2e_ms - c.mean_ttft_ms
        return 0.0 if math.isnan(rest) else float(rest)
    return 0.0


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
