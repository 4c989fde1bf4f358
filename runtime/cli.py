"""The `disagg` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

DEFAULT_MODEL_DIR = Path(
    os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
) / "disagg" / "tiny-llama"


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


def _status(args: argparse.Namespace) -> int:
    from runtime.serve_cli import show_status

    return show_status(args.address, args.app)


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
