"""Where a serving setup's CPU goes per output token: per-process CPU by role, and py-spy
samples of the front-end processes, under one workload at one rate.

    python -m benchmarks.path_profile --target colocated --workload long_output --rate 2

  1. start the target (as `disagg bench compare` does: same cores, engines at nice 10) and
     warm it up;
  2. run the load while py-spy samples every front-end process (our ingress and replicas,
     Serve's proxy, vLLM's API server) at 100 Hz;
  3. print CPU ms per output token by role, and for each sampled role the share of its samples
     by package (ray, vllm, asyncio, json, our code...) and its top functions (self time).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from benchmarks import cpu_usage
from benchmarks.compare import resolve_model, warmup_requests
from benchmarks.loadgen import run_load
from benchmarks.targets import TARGETS, EngineSettings, SchedulerSettings, make_target
from benchmarks.workloads import WORKLOADS, synthetic

PROFILED_ROLES = ("ingress", "replica", "proxy", "api_server")


_PACKAGES = (("ray/", "ray"), ("vllm/", "vllm"), ("starlette/", "starlette/fastapi"),
             ("fastapi/", "starlette/fastapi"), ("uvicorn/", "uvicorn"), ("grpc/", "grpc"),
             ("torch/", "torch"), ("asyncio/", "asyncio"), ("json/", "json"),
             ("pydantic", "pydantic"), ("msgpack/", "msgpack"), ("tokenizers/", "tokenizers"),
             ("runtime/", "disagg"), ("decode_workers/", "disagg"),
             ("prefill_workers/", "disagg"), ("kv_transfer/", "disagg"),
             ("concurrent/", "threads (C calls)"), ("threading.py", "threads (C calls)"))


def _package(frame: str) -> str:
    """A frame 'function (path:line)' -> the package its file belongs to (py-spy prints paths
    relative to site-packages or the project)."""
    path = frame.rsplit("(", 1)[-1].split("site-packages/")[-1]
    for marker, name in _PACKAGES:
        if path.startswith(marker) or f"/{marker}" in path:
            return name
    return "other"


def summarize_raw(path: Path, top: int = 12) -> tuple[int, dict[str, int], list[tuple[str, int]]]:
    """py-spy's raw (collapsed) output -> samples, samples by package (self), top functions."""
    total, by_package, by_function = 0, collections.Counter(), collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        leaf = stack.split(";")[-1]
        total += count
        by_package[_package(leaf)] += count
        by_function[leaf] += count
    return total, dict(by_package), by_function.most_common(top)


def _profiled_pids(roots: list[int]) -> dict[str, list[int]]:
    snap = cpu_usage.snapshot(roots)
    pids: dict[str, list[int]] = collections.defaultdict(list)
    for (pid, _), role in snap.roles.items():
        if role in PROFILED_ROLES:
            pids[role].append(pid)
    return pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=TARGETS, default="colocated")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="long_output")
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--cores", default="0,1")
    parser.add_argument("--max-context", type=int, default=8192)
    parser.add_argument("--out", default="", help="directory for logs and raw profiles")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration_s <= 0:
        parser.error("--rate and --duration-s must be positive")
    out = Path(args.out or tempfile.mkdtemp(prefix="path-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    cores = tuple(c.strip() for c in args.cores.split(",") if c.strip())
    engine = EngineSettings(str(resolve_model(None)), cores, args.max_context + 256, 32, 2048,
                            512 << 20)
    target = make_target(args.target, out, engine, SchedulerSettings(1024, 1024))
    try:
        target.start()
        asyncio.run(run_load(target.base_urls, "tiny", warmup_requests(args.max_context),
                             progress=False, max_duration_s=120))
        roots = [p.pid for p in target.procs]
        pids = _profiled_pids(roots)
        requests = synthetic(args.workload, max(4, round(args.rate * args.duration_s)),
                             args.rate, max_context=args.max_context)
        spies = []
        for role, role_pids in pids.items():
            for pid in role_pids:
                raw = out / f"{role}-{pid}.txt"
                spies.append((role, raw, subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw",
                     "--rate", "100", "--nonblocking", "-p", str(pid), "-o", str(raw)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        before = cpu_usage.snapshot(roots)
        records = asyncio.run(run_load(target.base_urls, "tiny", requests, max_duration_s=300))
        cpu = cpu_usage.cpu_by_role(before, cpu_usage.snapshot(roots))
        for _, _, spy in spies:
            spy.send_signal(2)
        for _, _, spy in spies:
            spy.wait(30)
    finally:
        target.stop()
    tokens = sum(r.num_output_tokens for r in records if not r.error)
    print(f"\n{args.target}, {args.workload} at {args.rate:g}/s: {len(records)} requests, "
          f"{tokens} output tokens, {sum(1 for r in records if r.error)} errors")
    print("CPU ms per output token by role: " + ", ".join(
        f"{role} {1e3 * s / max(tokens, 1):.3f}" for role, s in cpu.items()))
    for role, raw, _ in spies:
        if not raw.exists():
            continue
        total, packages, functions = summarize_raw(raw)
        print(f"\n{raw.stem} ({total} samples): " + ", ".join(
            f"{name} {100 * n / max(total, 1):.0f}%"
            for name, n in sorted(packages.items(), key=lambda kv: -kv[1])))
        for frame, n in functions:
            print(f"  {100 * n / max(total, 1):5.1f}%  {frame[:110]}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    psutil.cpu_percent()
    sys.exit(main())
