"""`disagg bench compare`: disagg against colocated serving, plain vLLM and Ray Serve LLM.

One run, the same cores and the same arrival sequences for every target:
  1. for each target (disagg, colocated, vllm, rayllm): start it, warm it up, then for each
     rate send the workload's requests open-loop (seeded Poisson or gamma arrivals), recording
     TTFT, TPOT, inter-token latencies, end-to-end and the server's own phase timings; stop it;
  2. summarize per rate and request class (short / long), with goodput under the SLOs;
  3. write results.json (summaries), records.json.gz (every request), results.md and plots.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import get_args

import httpx

from benchmarks import cpu_usage
from benchmarks.compare_report import markdown, plots
from benchmarks.loadgen import RequestRecord, run_load
from benchmarks.summary import SLO, RunSummary, summarize
from benchmarks.targets import (
    MODEL_NAME,
    TARGETS,
    EngineSettings,
    SchedulerSettings,
    TargetName,
    make_target,
)
from benchmarks.timeline_cost import estimate_costs
from benchmarks.workloads import (
    WORKLOADS,
    BenchRequest,
    WorkloadName,
    read_azure_trace,
    read_mooncake_trace,
    synthetic,
)
from runtime.messages import REPORT_PERIOD_S, USAGE_EVERY

DEFAULT_OUT = Path("benchmarks/results")
USAGE_PERIOD_S = REPORT_PERIOD_S * USAGE_EVERY  # how often a replica reports its engine's time


def workload(args: argparse.Namespace, rate: float, seed: int) -> list[BenchRequest]:
    if args.trace:
        rows = (read_mooncake_trace if args.trace.endswith(".jsonl") else read_azure_trace)(
            args.trace)
        # the trace's own mix and burstiness, replayed at `rate` (its time axis rescaled) for
        # about duration_s; prompts capped to the engines' context
        scale = (len(rows) / rate) / (rows[-1].arrival_s or 1.0)
        n = min(len(rows), args.max_requests, max(4, round(rate * args.duration_s)))
        return [BenchRequest(r.arrival_s * scale, min(r.prompt_len, args.max_context - 64),
                             max(1, min(r.output_len, 128))) for r in rows[:n]]
    n = min(args.max_requests, max(4, round(rate * args.duration_s)))
    return synthetic(args.workload, n, rate, max_context=args.max_context,
                     long_fraction=args.long_fraction, burstiness=args.burstiness, seed=seed)


def estimate_from_arrivals(records: list[RequestRecord], num_engines: int,
                           budget_tokens: int) -> None:
    """Each record's estimated engine-seconds by phase (the load generator sends request i to
    engine i mod num_engines)."""
    costs = estimate_costs(records, lambda r: r.index % num_engines, budget_tokens)
    for record in records:
        cost = costs.get(record.index)
        if cost is not None:
            record.estimated_cost = {"prefill_engine_s": cost.prefill_engine_s,
                                     "decode_engine_s": cost.decode_engine_s}


def engines_busy_s(base_urls: list[str]) -> float | None:
    """The engines' busy seconds so far, summed, from our ingress's /metrics
    (disagg_engine_busy_seconds, each replica's last usage report); None for a server that
    has no such metric (plain vLLM, Ray Serve LLM)."""
    total, found = 0.0, False
    for url in base_urls:
        try:
            text = httpx.get(f"{url}/metrics", timeout=5.0).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith("disagg_engine_busy_seconds{"):
                total += float(line.rsplit(" ", 1)[1])
                found = True
    return total if found else None


def warmup_requests(max_context: int) -> list[BenchRequest]:
    """A few of each kind, spread out: first-use costs stay out of the measured runs."""
    return [BenchRequest(0.0, 200, 8), BenchRequest(0.5, 300, 8),
            BenchRequest(1.0, int(0.6 * max_context), 8), BenchRequest(4.0, 100, 8),
            BenchRequest(4.5, int(0.6 * max_context), 8), BenchRequest(8.0, 400, 8)]


def run_target(name: TargetName, args: argparse.Namespace, out_dir: Path,
               engine: EngineSettings, scheduler: SchedulerSettings,
               slo: SLO) -> list[tuple[RunSummary, list[RequestRecord]]]:
    target = make_target(name, out_dir, engine, scheduler)
    results = []
    try:
        target.start(args.start_timeout_s)
        warm = asyncio.run(run_load(target.base_urls, MODEL_NAME,
                                    warmup_requests(args.max_context), progress=False,
                                    max_duration_s=120))
        failed = [r.error for r in warm if r.error]
        if failed:
            raise RuntimeError(f"{name}: warm-up requests failed: {failed[:2]}")
        for rate in args.rates:
            requests = workload(args, rate, args.seed)
            print(f"[{name}] {rate:g} req/s: {len(requests)} requests over "
                  f"{requests[-1].arrival_s:.0f} s", file=sys.stderr, flush=True)
            roots = [proc.pid for proc in target.procs]
            busy_before = engines_busy_s(target.base_urls)
            if busy_before is not None:  # after the warm-up's last usage report
                time.sleep(2.0 * USAGE_PERIOD_S)
                busy_before = engines_busy_s(target.base_urls)
            before = cpu_usage.snapshot(roots)
            records = asyncio.run(run_load(target.base_urls, MODEL_NAME, requests,
                                           seed=args.seed, max_duration_s=args.max_run_s,
                                           request_timeout_s=args.max_run_s))
            cpu = cpu_usage.cpu_by_role(before, cpu_usage.snapshot(roots))
            if name == "vllm":  # reports no cost: estimate it, one engine per base URL
                estimate_from_arrivals(records, len(target.base_urls),
                                       engine.max_num_batched_tokens)
            busy_s = None
            if busy_before is not None:
                time.sleep(2.0 * USAGE_PERIOD_S)  # the replicas' last usage report
                busy_after = engines_busy_s(target.base_urls)
                busy_s = None if busy_after is None else busy_after - busy_before
            summary = summarize(name, rate, records, slo, args.long_prompt_tokens, cpu,
                                busy_s)
            s, lo = summary.classes["short"], summary.classes["long"]
            print(f"[{name}] {rate:g} req/s: short p99 TTFT {s.ttft_ms['p99']:.0f} ms, "
                  f"p99 TPOT {s.tpot_ms['p99']:.1f} ms; long p99 TTFT {lo.ttft_ms['p99']:.0f} "
                  f"ms; goodput {summary.goodput_per_s:.2f} req/s; CPU "
                  f"{summary.cpu_ms_per_token:.2f} ms/token; errors "
                  f"{summary.classes['all'].num_errors}", file=sys.stderr, flush=True)
            results.append((summary, records))
    finally:
        target.stop()
    return results


def stop_on_sigterm() -> None:
    """A SIGTERM (a `timeout`, a job runner) ends the run as Ctrl-C does: the target that is
    running gets stopped (its `finally`), so no server or engine outlives the benchmark."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    command = list(argv if argv is not None else sys.argv[1:])
    args = build_parser().parse_args(command)
    stop_on_sigterm()
    if args.quick:
        args.rates = args.rates or [2.0, 4.0]
        args.duration_s = args.duration_s or 25.0
    args.rates = args.rates or [2.0, 4.0, 6.0]
    args.duration_s = args.duration_s or 45.0
    if args.trace and not Path(args.trace).is_file():
        print(f"error: trace file {args.trace} not found", file=sys.stderr)
        return 2
    model = resolve_model(args.model)
    cores = tuple(c.strip() for c in args.cores.split(",") if c.strip())
    if len(cores) < 2:
        print("error: --cores needs at least two entries (one per engine)", file=sys.stderr)
        return 2
    engine = EngineSettings(str(model), cores, args.max_context + 256, args.max_num_seqs,
                            args.max_num_batched_tokens, args.kv_cache_mib << 20)
    scheduler = SchedulerSettings(args.long_prompt_tokens, args.local_max_prompt_tokens,
                                  args.slo_ttft_ms, args.slo_tpot_ms,
                                  args.long_prefill_chunk_tokens, args.scheduling_policy)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    label = Path(args.trace).stem if args.trace else args.workload
    out_dir = Path(args.out or DEFAULT_OUT / f"compare-{label}{'-quick' if args.quick else ''}")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: list[RunSummary] = []
    records: dict[tuple[str, float], list[RequestRecord]] = {}
    for name in args.targets:
        for summary, recs in run_target(name, args, out_dir, engine, scheduler, slo):
            runs.append(summary)
            records[(name, summary.rate_per_s)] = recs
    notes = [f"workload `{label}`, seed {args.seed}, rates {args.rates} req/s, about "
             f"{args.duration_s:.0f} s of arrivals per rate; long = prompt >= "
             f"{args.long_prompt_tokens} tokens",
             f"{len(cores)} engines per target, pinned to cores {', '.join(cores)} "
             f"(disagg: {max(1, len(cores) // 2)} prefill + the rest decode); max_num_seqs "
             f"{args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens} "
             "(chunked prefill), block size 128, same in every target",
             f"command: `disagg bench compare {' '.join(command)}`",
             f"wall time {time.perf_counter() - started:.0f} s"]
    title = f"disagg vs colocated vs vLLM vs Ray Serve LLM: {label}"
    (out_dir / "results.md").write_text(markdown(title, runs, slo, notes))
    image_paths = plots(out_dir, runs, records, args.long_prompt_tokens)
    write_results(out_dir, vars(args), notes, runs, records)
    print((out_dir / "results.md").read_text())
    print(f"[compare] wrote {out_dir}/results.json, results.md, "
          f"{', '.join(p.name for p in image_paths)} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    return 0


def write_results(out_dir: Path, args: dict[str, object], notes: list[str],
                  runs: list[RunSummary],
                  records: dict[tuple[str, float], list[RequestRecord]]) -> None:
    """results.json: the options and the summaries; records.json.gz: every request's record
    (TTFT, inter-token latencies, end-to-end, the server's timings), by target@rate."""
    with open(out_dir / "results.json", "w") as f:
        json.dump({"args": args, "notes": notes, "summaries": [r.to_json() for r in runs]}, f,
                  indent=1)
    with gzip.open(out_dir / "records.json.gz", "wt") as f:
        json.dump({f"{t}@{rate:g}": [r.to_json() for r in recs]
                   for (t, rate), recs in records.items()}, f)


def resolve_model(path: str | None) -> Path:
    from runtime.tiny_model import DEFAULT_MODEL_DIR, is_tiny_model, make_tiny_model

    if path:
        model = Path(path).expanduser()
        if not (model / "config.json").exists():
            raise SystemExit(f"error: no checkpoint at {model} (config.json missing)")
        return model
    if not is_tiny_model(DEFAULT_MODEL_DIR):
        print(f"[compare] generating the tiny model in {DEFAULT_MODEL_DIR}", file=sys.stderr)
        make_tiny_model(DEFAULT_MODEL_DIR)
    return DEFAULT_MODEL_DIR


def _rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be positive numbers, comma-separated")
    return sorted(rates)


def _targets(text: str) -> list[TargetName]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown target(s) {bad}; choose from {TARGETS}")
    return names  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="disagg bench compare",
        description="Run disagg (prefill/decode pools + global scheduler), colocated serving "
        "(our ingress, disaggregation off), plain vLLM OpenAI servers (round-robin) and Ray "
        "Serve LLM's OpenAI app (build_openai_app) one after another on the same pinned cores "
        "with the same seeded arrivals; write results.json, results.md (p50/p90/p99 TTFT and "
        "TPOT for short and long requests, goodput under the SLOs, throughput, per-phase "
        "split) and PNG plots.")
    p.add_argument("--workload", choices=list(get_args(WorkloadName)), default="mixed",
                   help="synthetic workload family (default mixed): "
                   # argparse formats help with %: the descriptions' percent signs escaped
                   + "; ".join(f"{k}: {v}" for k, v in WORKLOADS.items()).replace("%", "%%"))
    p.add_argument("--trace", help="replay an Azure (.csv) or Mooncake (.jsonl) trace instead, "
                   "rescaled to each rate")
    p.add_argument("--quick", action="store_true",
                   help="two rates, 25 s of arrivals each (about 5-6 minutes in all)")
    p.add_argument("--rates", type=_rates, help="requests/s, comma-separated "
                   "(default 2,4,6; quick 2,4)")
    p.add_argument("--duration-s", type=float, help="seconds of arrivals per rate "
                   "(default 45; quick 25)")
    p.add_argument("--max-requests", type=int, default=2000, help="cap per rate")
    p.add_argument("--targets", type=_targets, default=list(TARGETS),
                   help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--cores", default="0,1", help="one core set per engine, comma-separated "
                   "(default 0,1: two engines, one core each)")
    p.add_argument("--model", help="checkpoint directory (default: the tiny model)")
    p.add_argument("--max-context", type=int, default=8192,
                   help="long prompts take 50-90%% of this many tokens (default 8192)")
    p.add_argument("--long-fraction", type=float, default=0.1,
                   help="share of long prompts in `mixed` (default 0.1)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 Poisson, < 1 burstier")
    p.add_argument("--long-prompt-tokens", type=int, default=1024,
                   help="long-lane threshold, also the short/long split of the report")
    p.add_argument("--local-max-prompt-tokens", type=int, default=None,
                   help="disagg: the longest prompt the decode replica may prefill itself "
                   "(default: no cap; the scheduler decides by predicted time and TPOT budget)")
    p.add_argument("--long-prefill-chunk-tokens", type=int, default=None,
                   help="disagg and colocated: a prefill's most tokens per engine step while "
                   "other requests run (engine.long_prefill_chunk_tokens; default: the app's, "
                   "512; 0: no cap). vLLM and Ray Serve LLM keep vLLM's default")
    p.add_argument("--scheduling-policy", choices=["priority", "fcfs"], default=None,
                   help="disagg and colocated: vLLM's scheduling policy in our engines "
                   "(default: the app's, priority by lane)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="per-step token budget (chunked prefill), every engine")
    p.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache per engine")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-run-s", type=float, default=300.0,
                   help="bound on one rate's run; unfinished requests count as errors")
    p.add_argument("--start-timeout-s", type=float, default=300.0)
    p.add_argument("--out", help="output directory (default benchmarks/results/compare-<workload>)")
    return p


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    sys.exit(main())
