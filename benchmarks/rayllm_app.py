"""Ray Serve LLM's own OpenAI app (`ray.serve.llm.build_openai_app`): the `rayllm` target.

What a Ray user deploys instead of disagg: one LLMConfig, `num_replicas` vLLM engines behind
Ray Serve LLM's OpenAI ingress, its defaults otherwise (e.g. its 50 ms stream batching).
The comparison (benchmarks/targets.py) runs this module as a child process:
  1. start a local Ray (no dashboard) and Serve's HTTP proxy on 127.0.0.1:PORT;
  2. deploy the app: the same engine arguments as every other target; every replica gets
     VLLM_CPU_OMP_THREADS_BIND=nobind and one OpenMP thread (Ray Serve LLM gives all replicas
     one environment, so the harness pins each engine to its own core once it is up);
  3. wait until every LLM replica is RUNNING, then write the ready file;
  4. on SIGTERM or SIGINT: shut Serve and Ray down and exit.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.targets import MODEL_NAME, EngineSettings

APP_NAME = "rayllm"


def serving_args(engine: EngineSettings) -> dict[str, Any]:
    """`build_openai_app`'s LLMServingArgs: one model, one replica per entry of `cores`."""
    llm_config = {
        "model_loading_config": {"model_id": MODEL_NAME, "model_source": engine.model},
        "accelerator_config": {"kind": "cpu"},
        "deployment_config": {"num_replicas": len(engine.cores)},
        "runtime_env": {"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                     "OMP_NUM_THREADS": "1"}},
        "engine_kwargs": {"dtype": "float32", "block_size": engine.block_size,
                          "max_model_len": engine.max_model_len,
                          "max_num_seqs": engine.max_num_seqs,
                          "max_num_batched_tokens": engine.max_num_batched_tokens,
                          "kv_cache_memory_bytes": engine.kv_cache_bytes,
                          "enforce_eager": True},
    }
    return {"llm_configs": [llm_config]}


def num_logical_cpus(num_replicas: int) -> int:
    """Ray's CPU count for scheduling only: each LLM replica's placement group asks for 2 (its
    actor and its engine's bundle), the ingress for 1. Cores are the harness's business."""
    return 2 * num_replicas + 1


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    return EngineSettings(args.model, tuple(args.cores.split(",")), args.max_model_len,
                          args.max_num_seqs, args.max_num_batched_tokens, args.kv_cache_bytes,
                          args.block_size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--cores", required=True, help="one core set per replica, comma-separated")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--max-num-seqs", type=int, required=True)
    p.add_argument("--max-num-batched-tokens", type=int, required=True)
    p.add_argument("--kv-cache-bytes", type=int, required=True)
    p.add_argument("--block-size", type=int, required=True)
    return p


def _num_running_replicas(deployment: str) -> int:
    from ray import serve
    from ray.serve.schema import ReplicaState

    app = serve.status().applications.get(APP_NAME)
    status = app.deployments.get(deployment) if app else None
    return status.replica_states.get(ReplicaState.RUNNING, 0) if status else 0


def _stop(signum: int, frame: object) -> None:
    """Unwind main() from wherever it blocks (serve.run included) into its shutdown, once."""
    _on_stop_signals(signal.SIG_IGN)
    raise SystemExit(0)


def _on_stop_signals(handler: Any) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def main() -> int:
    args = build_parser().parse_args()
    engine = engine_settings(args)
    _on_stop_signals(_stop)

    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    ray.init(include_dashboard=False, num_cpus=num_logical_cpus(len(engine.cores)))
    _on_stop_signals(_stop)  # ray.init put its own in place (a stack dump, then ours)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_openai_app(serving_args(engine)), name=APP_NAME, route_prefix="/")
        deployment = f"LLMServer:{MODEL_NAME}"
        while _num_running_replicas(deployment) < len(engine.cores):
            time.sleep(1.0)
        args.ready_file.write_text(f"{deployment}: {len(engine.cores)} replicas RUNNING\n")
        print(f"[rayllm] serving {MODEL_NAME} on 127.0.0.1:{args.port} with "
              f"{len(engine.cores)} replicas", flush=True)
        threading.Event().wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
