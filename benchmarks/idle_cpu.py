"""What a serving setup costs with nothing to do: CPU-seconds per second of each of its
processes while no request is in flight (on a small machine this is taken from the engines
all the time).

    python -m benchmarks.idle_cpu [--target colocated] [--window-s 20]

Starts the target as `disagg bench compare` does (same cores, engines at nice 10), waits
10 s after it is up, reads every process of its tree with psutil over the window, prints the
busiest processes and the total without the engines, then sends one completion (the setup
still serves) and stops it.
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx
import psutil

from benchmarks import cpu_usage
from benchmarks.compare import resolve_model, stop_on_sigterm
from benchmarks.targets import MODEL_NAME, add_probe_arguments, probe_target


def per_process(before: cpu_usage.CpuSnapshot, after: cpu_usage.CpuSnapshot,
                window_s: float) -> list[tuple[float, str, tuple[int, float]]]:
    """(CPU-s per s, role, process key) for every process, busiest first."""
    rows = [(max(0.0, seconds - before.seconds.get(key, 0.0)) / window_s, after.roles[key], key)
            for key, seconds in after.seconds.items()]
    return sorted(rows, key=lambda row: -row[0])


def _label(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return f"{proc.name()} {' '.join(proc.cmdline())[:70]}"
    except psutil.Error:
        return "(exited)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_probe_arguments(parser, "benchmarks/results/idle_cpu")
    parser.add_argument("--window-s", type=float, default=20.0)
    args = parser.parse_args(argv)
    if args.window_s <= 0:
        parser.error("--window-s must be positive")
    stop_on_sigterm()
    target = probe_target(args, str(resolve_model(None)))
    try:
        target.start(300)
        time.sleep(10.0)  # start-up work (calibration, first reports) out of the window
        roots = [proc.pid for proc in target.procs]
        print(f"[idle] measuring {args.target} for {args.window_s:.0f} s, no requests",
              file=sys.stderr, flush=True)
        before = cpu_usage.snapshot(roots)
        time.sleep(args.window_s)
        rows = per_process(before, cpu_usage.snapshot(roots), args.window_s)
        print(f"{args.target}, idle: CPU-seconds per second by process (busiest first)")
        for rate, role, (pid, _) in rows[:16]:
            print(f"  {rate:.4f}  {role:10s}  {_label(pid)}")
        others = sum(rate for rate, role, _ in rows if role != "engine")
        print(f"  total without the engines: {others:.3f}")
        response = httpx.post(f"{target.base_urls[0]}/v1/completions", timeout=60.0,
                              json={"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 4})
        print(f"  a completion after the window: HTTP {response.status_code}")
    finally:
        target.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
