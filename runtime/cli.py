"""The `disagg` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.tiny_model import DEFAULT_MODEL_DIR

if TYPE_CHECKING:
    from runtime.scheduler.sim.plan import PlanRow


def _make_tiny_model(args: argparse.Namespace) -> int:
    from runtime.tiny_model import make_tiny_model

    out = make_tiny_model(args.dir, seed=args.seed)
    print(f"tiny Llama checkpoint written to {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from runtime.tiny_model import is_tiny_model, make_tiny_model

    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    if not args.model and not is_tiny_model(model_dir):
        print(f"[demo] generating the tiny model in {model_dir}", flush=True)
        make_tiny_model(model_dir)
    if not (model_dir / "config.json").exists():
        print(f"error: no Hugging Face checkpoint at {model_dir}", file=sys.stderr)
        return 2
    from runtime.demo import run_demo, run_ray_demo

    if args.engines_only:
        return asyncio.run(run_demo(model_dir, args.max_tokens, args.kv_cache_mib << 20))
    return run_ray_demo(model_dir, args.max_tokens, args.kv_cache_mib << 20)


def _serve(args: argparse.Namespace) -> int:
    from runtime.serve_cli import serve_forever

    if not Path(args.config).is_file():
        print(f"error: no config file at {args.config}", file=sys.stderr)
        return 2
    try:
        return serve_forever(Path(args.config), args.api_key, args.address, args.detach)
    except ValueError as err:  # pydantic's ValidationError is one
        print(f"error: invalid config {args.config}:\n{err}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from benchmarks.compare import main as compare

    return compare(args.args)


def _status(args: argparse.Namespace) -> int:
    from runtime.serve_cli import show_status

    return show_status(args.address, args.app)


def _plan(args: argparse.Namespace) -> int:
    from runtime.scheduler.sim.cost_model import H100, H100X8, LLAMA3_8B, LLAMA3_70B, CostModel
    from runtime.scheduler.sim.plan import plan
    from runtime.scheduler.sim.workload import mixed, read_trace

    models = {"llama-3-70b": LLAMA3_70B, "llama-3-8b": LLAMA3_8B}
    hardware = {"8xh100": H100X8, "h100": H100}
    cost = CostModel(models[args.model], hardware[args.hardware])
    if args.trace:
        trace = read_trace(args.trace)
        if not trace:
            print(f"error: no requests in {args.trace}", file=sys.stderr)
            return 2
    else:
        trace = mixed(args.requests, args.rate, args.long_fraction, seed=args.seed)
    print(f"[plan] {len(trace)} requests, {args.replicas} replicas of {args.hardware}, "
          f"{args.model}: simulating colocated and every prefill:decode split", flush=True)
    rows = plan(cost, trace, args.replicas, args.ttft_slo_ms, args.tpot_slo_ms,
                args.long_prompt_tokens, progress=True,
                prefill_cost_per_replica_hour=args.prefill_cost_per_replica_hour,
                decode_cost_per_replica_hour=args.decode_cost_per_replica_hour)
    priced = args.prefill_cost_per_replica_hour > 0 or args.decode_cost_per_replica_hour > 0
    print("\n" + "\n".join(_plan_table(rows[: args.top], priced)))
    best = rows[0]
    if best.mode == "colocated":
        print("\nrecommendation: colocated serving (disaggregation does not pay here)")
    else:
        print(f"\nrecommendation: {best.num_prefill} prefill : {best.num_decode} decode replicas"
              + (f", {best.num_long_prefill} of the prefill replicas in the long lane"
                 if best.mode == "policy" else "") + f" ({best.mode})")
    print("cost by prompt length there (mean per request):")
    for band in best.summary.cost.bands:
        mean = band.per_request
        print(f"  {band.name + ' tokens':>16}: {band.num_requests:>6} requests, prefill "
              f"{mean.prefill_engine_s:.3f} + decode {mean.decode_engine_s:.3f} engine-s"
              + (f", ${mean.dollars:.4f}" if priced else "") + "; prefill "
              f"{band.prefill_engine_s_per_1k_prompt_tokens:.3f} engine-s per 1K prompt tokens")
    return 0


def _plan_table(rows: list[PlanRow], priced: bool) -> list[str]:
    """The ranked splits: latency and goodput, then what a request costs (engine-seconds
    prefill+decode, dollars where priced) and the share of replica time left idle."""
    lines = [f"{'mode':<10} {'P:D':>6} {'long':>5} {'goodput/s':>10} {'shortTTFT p99':>14} "
             f"{'TPOT p99':>9} {'local':>6} {'eng-s/req P+D':>14} {'eng-s/1K':>9}"
             + (f" {'$/req':>8} {'$/1K':>8}" if priced else "") + f" {'idle':>5}"]
    for row in rows:
        s, c = row.summary, row.summary.cost
        split = "-" if row.mode == "colocated" else f"{row.num_prefill}:{row.num_decode}"
        long_ = str(row.num_long_prefill) if row.mode == "policy" else "-"
        per_request, per_1k = c.per_request, c.per_1k_output_tokens
        engine_s = f"{per_request.prefill_engine_s:.3f}+{per_request.decode_engine_s:.3f}"
        lines.append(
            f"{row.mode:<10} {split:>6} {long_:>5} {s.goodput_rps:>10.1f} "
            f"{s.short_ttft_p99_ms:>12.0f}ms {s.tpot_p99_ms:>7.1f}ms {s.local_fraction:>6.0%} "
            f"{engine_s:>14} {per_1k.engine_s:>9.3f}"
            + (f" {per_request.dollars:>8.4f} {per_1k.dollars:>8.4f}" if priced else "")
            + f" {c.idle_fraction:>5.0%}")
    return lines


def _price(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"a price is at least 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disagg",
        description="Disaggregated prefill/decode LLM serving on vLLM: prefill and decode run on "
        "separate engines and the prompt's KV cache blocks move between them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight Llama checkpoint (no download)",
        description="Write a tiny Llama-architecture Hugging Face checkpoint (safetensors, "
        "config, byte-level tokenizer, chat template; 16K context), deterministic per seed.",
    )
    tiny.add_argument("dir", help="output directory (created if missing)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(func=_make_tiny_model)

    demo = sub.add_parser(
        "demo",
        help="serve a few prompts disaggregated and print their latency split",
        description="Start local Ray with one prefill and one decode replica on the tiny model "
        "(generated on first use), send short and long prompts through the HTTP API, print "
        "each output and its phase timings, then shut down.",
    )
    demo.add_argument("--model", help=f"checkpoint directory (default: the tiny model in "
                                      f"{DEFAULT_MODEL_DIR})")
    demo.add_argument("--max-tokens", type=_positive_int, default=16,
                      help="tokens to generate per prompt (default 16)")
    demo.add_argument("--kv-cache-mib", type=_positive_int, default=512,
                      help="KV cache per engine in MiB (default 512)")
    demo.add_argument("--verbose", action="store_true", help="show vLLM's own logs")
    demo.add_argument("--engines-only", action="store_true",
                      help="run the two engines in this process, without Ray Serve")
    demo.set_defaults(func=_demo)

    serve_cmd = sub.add_parser(
        "serve",
        help="run the cluster app (prefill pool, decode pool, ingress) on Ray Serve",
        description="Start or join Ray and run the disagg app from a YAML config (see "
        "deploy/*.yaml). Serves the OpenAI-compatible API on server.host:server.http_port.",
    )
    serve_cmd.add_argument("--config", required=True, help="YAML config file")
    serve_cmd.add_argument("--api-key", help="require this bearer token on /v1/*")
    serve_cmd.add_argument("--address", help="Ray cluster to join ('auto' after `ray up`/"
                                             "`ray start`); default: a new local Ray")
    serve_cmd.add_argument("--detach", action="store_true",
                           help="deploy and exit, leaving the app running on the cluster")
    serve_cmd.set_defaults(func=_serve)

    plan_cmd = sub.add_parser(
        "plan",
        help="recommend a prefill:decode split by simulation",
        description="Simulate colocated serving, static disaggregation and the disagg policy "
        "for every prefill:decode split of a cluster, on a synthetic mixed workload or a trace "
        "file (CSV rows: timestamp s, input tokens, output tokens), and rank them by goodput. "
        "Each row also says what a request costs at that split and load, accounted as the live "
        "runtime does (each engine step's time divided among its requests by scheduled "
        "tokens): 'eng-s/req P+D' is the mean prefill + decode engine-seconds per request (an "
        "engine-second is one replica, all its GPUs, for one second), 'eng-s/1K' the "
        "engine-seconds per 1,000 output tokens, '$/req' and '$/1K' the same in money at the "
        "pools' prices (shown when a price is set), and 'idle' the share of the cluster's "
        "replica-seconds no request used (reported apart, not in the per-request costs). "
        "Below the table: the recommended split's cost by prompt length.",
    )
    plan_cmd.add_argument("--model", choices=["llama-3-70b", "llama-3-8b"],
                          default="llama-3-70b")
    plan_cmd.add_argument("--hardware", choices=["8xh100", "h100"], default="8xh100",
                          help="what one replica runs on (default 8xh100)")
    plan_cmd.add_argument("--replicas", type=_positive_int, default=16)
    plan_cmd.add_argument("--rate", type=float, default=40.0, help="requests/s (synthetic)")
    plan_cmd.add_argument("--requests", type=_positive_int, default=6000)
    plan_cmd.add_argument("--long-fraction", type=float, default=0.02,
                          help="share of 32K-128K-token prompts (synthetic)")
    plan_cmd.add_argument("--trace", help="replay this trace file instead")
    plan_cmd.add_argument("--ttft-slo-ms", type=float, default=300.0)
    plan_cmd.add_argument("--tpot-slo-ms", type=float, default=50.0)
    plan_cmd.add_argument("--long-prompt-tokens", type=_positive_int, default=16384)
    plan_cmd.add_argument("--seed", type=int, default=0)
    plan_cmd.add_argument("--top", type=_positive_int, default=10, help="rows to print")
    plan_cmd.add_argument(
        "--prefill-cost-per-replica-hour", type=_price, default=0.0,
        help="price of one prefill replica per hour, any currency (as a pool's "
        "cost_per_replica_hour in the app config); default 0: engine-seconds only (for scale: "
        "8xH100 cloud nodes list at roughly 20 to 100 US dollars an hour)")
    plan_cmd.add_argument(
        "--decode-cost-per-replica-hour", type=_price, default=0.0,
        help="price of one decode replica per hour (colocated replicas are priced at it); "
        "default 0: engine-seconds only")
    plan_cmd.set_defaults(func=_plan)

    bench = sub.add_parser(
        "bench",
        help="benchmarks: `disagg bench compare` (disagg vs colocated vs vLLM)",
        description="`disagg bench compare [options]`: run disagg, colocated serving and plain "
        "vLLM servers on the same cores and arrivals; `disagg bench compare --help` for options.",
    )
    bench.add_argument("bench", choices=["compare"], help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="its options (see its --help)")
    bench.set_defaults(func=_bench)

    status = sub.add_parser(
        "status",
        help="show the app's pools, replicas and their load",
        description="Connect to a running Ray cluster and show the disagg app's deployments, "
        "replica states, and the load and KV state of one replica per pool.",
    )
    status.add_argument("--address", default="auto", help="Ray cluster address (default auto)")
    status.add_argument("--app", default="disagg", help="Serve application name")
    status.set_defaults(func=_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
