"""The serving setups a comparison runs, each as child processes it starts and stops.

  1. `disagg`: `disagg serve` with the prefill and decode pools and the global scheduler.
  2. `colocated`: `disagg serve` with disaggregation off (serving: colocated): the same number
     of engines, each prefilling and decoding (chunked prefill), least-loaded routing.
  3. `vllm`: vLLM's own OpenAI server processes, unmodified, one per engine; the load
     generator round-robins over them (no code of ours in the serving path).
  4. `rayllm`: Ray Serve LLM's own OpenAI app (`build_openai_app`, benchmarks/rayllm_app.py),
     one replica per engine behind its ingress: what a Ray user deploys instead of disagg.

Every engine is pinned to its own cores (`cores[i]`), the same cores in every setup (`rayllm`
gives every replica one environment, so its engines are pinned from outside once up), and every
engine process (vLLM's engine core and workers) runs at nice ENGINE_NICE: the engines fill
every core, and the serving front-ends (vLLM's API server; Serve's proxy, ingress and
replicas) should get the CPU when they need it, as they would on cores of their own.
The same rule for every target. The servers stay in the benchmark's own session: with the
kernel's autogroup scheduling (sched_autogroup_enabled, on by default in desktop and many VM
kernels) a session is one scheduling group, and in a session of its own the load generator was
seen starved for 2 s at a time while the servers' session was busy (niceness only counts
within a group). A target's logs go to files in the run's directory; `stop`
ends all it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml

from benchmarks.affinity import pin_engines
from runtime.app_config import AppConfig
from runtime.engines import free_port

ENGINE_NICE = 10
ENGINE_PROCESS_PREFIX = "VLLM::"  # vLLM's names: VLLM::EngineCore, VLLM::Worker
TargetName = Literal["disagg", "colocated", "vllm", "rayllm"]
TARGETS: tuple[TargetName, ...] = ("disagg", "colocated", "vllm", "rayllm")
MODEL_NAME = "tiny"
# Ray starts its workers (Serve's proxy, ingress and replicas) at nice 15 by default; at 0 they
# compete as vLLM's API server does in the `vllm` target.
RAY_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_worker_niceness": "0"}


@dataclass(frozen=True)
class EngineSettings:
    """What every engine of every target gets, so the setups differ only in how they serve."""

    model: str
    cores: tuple[str, ...]  # one entry per engine
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_bytes: int
    block_size: int = 128


@dataclass(frozen=True)
class SchedulerSettings:
    long_prompt_tokens: int
    local_max_prompt_tokens: int | None
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 100.0  # also the decode replicas' TPOT budget for local prefills
    # our engines' per-step cap on a prefill while others run (engine.long_prefill_chunk_tokens)
    # and vLLM scheduling policy; None: the app's defaults (512, priority)
    long_prefill_chunk_tokens: int | None = None
    scheduling_policy: str | None = None


class Target:
    """A running setup: start() blocks until it serves, stop() until its processes exit."""

    def __init__(self, name: TargetName, out_dir: Path) -> None:
        self.name = name
        self.out_dir = out_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.base_urls: list[str] = []

    def _spawn(self, argv: list[str], log_name: str, env: dict[str, str] | None = None) -> None:
        log = open(self.out_dir / log_name, "wb")  # noqa: SIM115 - owned by the process
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, **(env or {})}))

    def start(self, timeout_s: float = 300.0) -> float:
        """Start and wait until every endpoint is up (`is_up`); returns seconds taken."""
        raise NotImplementedError

    def is_up(self, base_url: str) -> bool:
        """Whether the endpoint serves: its /health answers 200."""
        return httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200

    def _wait_healthy(self, timeout_s: float, started: float) -> float:
        pending = list(self.base_urls)
        while pending:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{self.name}: a server process exited with "
                                       f"{proc.returncode} while starting (logs in "
                                       f"{self.out_dir})")
            elapsed = time.perf_counter() - started
            if elapsed > timeout_s:
                raise RuntimeError(f"{self.name}: not healthy after {timeout_s:.0f} s "
                                   f"(logs in {self.out_dir})")
            try:
                if self.is_up(pending[0]):
                    pending.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            print(f"\r[{self.name}] starting: {elapsed:5.0f} s", end="", file=sys.stderr,
                  flush=True)
            time.sleep(2.0)
        took = time.perf_counter() - started
        num_engines = self._renice_engines()
        print(f"\r[{self.name}] up in {took:.0f} s ({num_engines} engine processes at nice "
              f"{ENGINE_NICE})", file=sys.stderr, flush=True)
        return took

    def _renice_engines(self) -> int:
        import psutil

        engines = []
        for proc in self.procs:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if child.name().startswith(ENGINE_PROCESS_PREFIX):
                        engines.append(child)
                except psutil.Error:
                    continue
        for engine in engines:  # niceness is per thread on Linux: every thread of the engine
            for thread in engine.threads():
                try:
                    os.setpriority(os.PRIO_PROCESS, thread.id, ENGINE_NICE)
                except OSError:
                    continue
        return len(engines)

    def stop(self, timeout_s: float = 90.0) -> None:
        """SIGTERM to each server's main process only (its own shutdown stops what it started,
        e.g. Ray and the engines), then SIGKILL to anything of its tree still alive."""
        import psutil

        tree = [child for proc in self.procs if proc.poll() is None
                for child in psutil.Process(proc.pid).children(recursive=True)]
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.perf_counter() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        _, alive = psutil.wait_procs(tree, timeout=10)
        names = set()
        for leftover in alive:
            with contextlib.suppress(psutil.Error):
                names.add(leftover.name())
                leftover.kill()
        if alive:
            print(f"[{self.name}] killed {len(alive)} process(es) left after its shutdown: "
                  f"{sorted(names)}", file=sys.stderr)
        self.procs.clear()


class ServeTarget(Target):
    """`disagg serve` on a fresh local Ray, disaggregated or colocated."""

    def __init__(self, name: TargetName, out_dir: Path, engine: EngineSettings,
                 scheduler: SchedulerSettings) -> None:
        super().__init__(name, out_dir)
        self.config = app_config(name, engine, scheduler, free_port())
        self.base_urls = [f"http://127.0.0.1:{self.config['server']['http_port']}"]

    def start(self, timeout_s: float = 300.0) -> float:
        AppConfig.model_validate(self.config)
        path = self.out_dir / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        started = time.perf_counter()
        self._spawn([sys.executable, "-m", "runtime.cli", "serve", "--config", str(path)],
                    f"{self.name}.log", RAY_ENV)
        return self._wait_healthy(timeout_s, started)


def app_config(name: TargetName, engine: EngineSettings, scheduler: SchedulerSettings,
               http_port: int) -> dict[str, Any]:
    """disagg: one prefill replica on the first core(s), the rest decode replicas on the
    others; colocated: every engine a decode-pool replica (prefill and decode)."""
    shared = {"model": engine.model, "dtype": "float32", "block_size": engine.block_size,
              "max_model_len": engine.max_model_len, "kv_cache_bytes": engine.kv_cache_bytes,
              "max_num_seqs": engine.max_num_seqs,
              "max_num_batched_tokens": engine.max_num_batched_tokens}
    if scheduler.long_prefill_chunk_tokens is not None:
        shared["long_prefill_chunk_tokens"] = scheduler.long_prefill_chunk_tokens
    if scheduler.scheduling_policy is not None:
        shared["scheduling_policy"] = scheduler.scheduling_policy
    cores = list(engine.cores)
    num_prefill = max(1, len(cores) // 2) if name == "disagg" else 0
    config: dict[str, Any] = {
        "serving": "disaggregated" if name == "disagg" else "colocated",
        "engine": shared,
        "decode": {"replicas": len(cores) - num_prefill, "num_cpus": 0,
                   "cpu_cores": cores[num_prefill:]},
        "transfer": {"data_channel": "tcp", "on_transfer_failure": "recompute"},
        "scheduler": {"long_prompt_tokens": scheduler.long_prompt_tokens,
                      "local_max_prompt_tokens": scheduler.local_max_prompt_tokens},
        "slo": {"ttft_ms": scheduler.slo_ttft_ms, "tpot_ms": scheduler.slo_tpot_ms},
        "server": {"host": "127.0.0.1", "http_port": http_port, "grpc_port": 0,
                   "served_model_name": MODEL_NAME, "app_name": f"bench-{name}"},
    }
    if num_prefill:
        config["prefill"] = {"replicas": num_prefill, "num_cpus": 0,
                             "cpu_cores": cores[:num_prefill]}
    return config


class VllmTarget(Target):
    """vLLM's own OpenAI server, one process per engine, each pinned to its cores."""

    def __init__(self, out_dir: Path, engine: EngineSettings) -> None:
        super().__init__("vllm", out_dir)
        self.engine = engine
        self.ports = [free_port() for _ in engine.cores]
        self.base_urls = [f"http://127.0.0.1:{port}" for port in self.ports]

    def start(self, timeout_s: float = 300.0) -> float:
        e = self.engine
        started = time.perf_counter()
        for i, (port, cores) in enumerate(zip(self.ports, e.cores, strict=True)):
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                    "--model", e.model, "--served-model-name", MODEL_NAME,
                    "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                    "--block-size", str(e.block_size), "--max-model-len", str(e.max_model_len),
                    "--max-num-seqs", str(e.max_num_seqs),
                    "--max-num-batched-tokens", str(e.max_num_batched_tokens),
                    "--kv-cache-memory-bytes", str(e.kv_cache_bytes), "--enforce-eager",
                    "--disable-uvicorn-access-log"]
            self._spawn(argv, f"vllm-{i}.log", {"VLLM_CPU_OMP_THREADS_BIND": cores})
        return self._wait_healthy(timeout_s, started)


class RayLlmTarget(Target):
    """Ray Serve LLM's OpenAI app on a fresh local Ray (benchmarks/rayllm_app.py)."""

    def __init__(self, out_dir: Path, engine: EngineSettings) -> None:
        super().__init__("rayllm", out_dir)
        self.engine = engine
        self.port = free_port()
        self.ready_file = out_dir / "rayllm.ready"
        self.base_urls = [f"http://127.0.0.1:{self.port}"]

    def start(self, timeout_s: float = 300.0) -> float:
        self.ready_file.unlink(missing_ok=True)
        started = time.perf_counter()
        self._spawn(rayllm_argv(self.engine, self.port, self.ready_file), "rayllm.log",
                    {**RAY_ENV, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL",
                                                                     "WARNING")})
        took = self._wait_healthy(timeout_s, started)
        self.ready_file.unlink()
        pinned = pin_engines([proc.pid for proc in self.procs], self.engine.cores)
        num_off = sum(engine.num_threads_off for engine in pinned)
        assert num_off == 0, f"{self.name}: {num_off} engine threads not on their cores"
        print(f"[{self.name}] engines pinned: " + ", ".join(
            f"pid {e.engine_pid} ({e.num_threads} threads) -> cores {sorted(e.cores)}"
            for e in pinned), file=sys.stderr, flush=True)
        return took

    def is_up(self, base_url: str) -> bool:
        """/v1/models answers once the ingress runs; the ready file says every LLM replica
        (engine) is RUNNING too."""
        return (self.ready_file.exists()
                and httpx.get(f"{base_url}/v1/models", timeout=2.0).status_code == 200)


def rayllm_argv(engine: EngineSettings, port: int, ready_file: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.rayllm_app", "--model", engine.model,
            "--cores", ",".join(engine.cores), "--port", str(port),
            "--ready-file", str(ready_file), "--max-model-len", str(engine.max_model_len),
            "--max-num-seqs", str(engine.max_num_seqs),
            "--max-num-batched-tokens", str(engine.max_num_batched_tokens),
            "--kv-cache-bytes", str(engine.kv_cache_bytes),
            "--block-size", str(engine.block_size)]


def make_target(name: TargetName, out_dir: Path, engine: EngineSettings,
                scheduler: SchedulerSettings) -> Target:
    if name == "vllm":
        return VllmTarget(out_dir, engine)
    if name == "rayllm":
        return RayLlmTarget(out_dir, engine)
    return ServeTarget(name, out_dir, engine, scheduler)


def add_probe_arguments(parser: Any, default_out: str) -> None:
    """--target, --cores and --out of a probe that starts one target on its own
    (benchmarks.idle_cpu, benchmarks.stream_cpu)."""
    parser.add_argument("--target", choices=TARGETS, default="colocated")
    parser.add_argument("--cores", default="0,1", help="one entry per engine")
    parser.add_argument("--out", default=default_out, help="directory for the target's logs")


def probe_target(args: Any, model: str) -> Target:
    """The target a probe's arguments name, on `model`, set up as `disagg bench compare` sets
    it up (the same engine settings on the same cores), not started yet."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = tuple(c.strip() for c in args.cores.split(",") if c.strip())
    engine = EngineSettings(model, cores, 8192 + 256, 32, 2048, 512 << 20)
    return make_target(args.target, out, engine, SchedulerSettings(1024, None))
