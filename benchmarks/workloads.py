"""Benchmark workloads: open-loop arrival schedules of (prompt length, output length), seeded.

Synthetic: `mixed` (mostly short chat prompts with short outputs, plus a fraction of long prompts
near the context limit), `short`, `long`. Traces: the Azure LLM inference trace CSV
(TIMESTAMP, ContextTokens, GeneratedTokens) and the Mooncake trace JSONL (timestamp in ms,
input_length, output_length). `write_sample_traces` makes small files of both formats; nothing
is downloaded.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

WorkloadName = Literal["mixed", "short", "long"]


@dataclass(frozen=True)
class BenchRequest:
    arrival_s: float  # since the start of the run
    prompt_len: int
    output_len: int


def arrivals(n: int, rate_per_s: float, burstiness: float, rng: random.Random) -> list[float]:
    """Gamma-distributed gaps with mean 1/rate; burstiness 1 is Poisson, < 1 burstier."""
    if rate_per_s <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    shape, t, out = burstiness, 0.0, []
    for _ in range(n):
        t += rng.gammavariate(shape, 1.0 / (rate_per_s * shape))
        out.append(t)
    return out


def synthetic(name: WorkloadName, n: int, rate_per_s: float, *, max_context: int = 16384,
              long_fraction: float = 0.1, burstiness: float = 1.0,
              seed: int = 0) -> list[BenchRequest]:
    """Requests sized for the tiny model's 16K context (long prompts at 50-90% of it)."""
    rng = random.Random(seed)
    times = arrivals(n, rate_per_s, burstiness, rng)
    out = []
    for t in times:
        is_long = name == "long" or (name == "mixed" and rng.random() < long_fraction)
        if is_long:
            prompt = rng.randint(int(0.5 * max_context), int(0.9 * max_context))
            output = rng.randint(16, 64)
        else:
            prompt = rng.randint(64, 512)
            output = rng.randint(16, 128)
        out.append(BenchRequest(t, prompt, min(output, max_context - prompt)))
    return out


def read_azure_trace(path: str | Path) -> list[BenchRequest]:
    """Azure LLM inference trace: TIMESTAMP (datetime), ContextTokens, GeneratedTokens."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            stamp = datetime.fromisoformat(row["TIMESTAMP"].strip().replace(" ", "T")[:26])
            rows.append((stamp, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    if not rows:
        return []
    start = min(r[0] for r in rows)
    return sorted((BenchRequest((s - start).total_seconds(), p, o) for s, p, o in rows),
                  key=lambda r: r.arrival_s)


def read_mooncake_trace(path: str | Path) -> list[BenchRequest]:
    """Mooncake trace: JSON lines with timestamp (ms), input_length, output_length."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                rows.append(BenchRequest(item["timestamp"] / 1e3, int(item["input_length"]),
                                         int(item["output_length"])))
    if not rows:
        return []
    start = min(r.arrival_s for r in rows)
    return sorted((BenchRequest(r.arrival_s - start, r.prompt_len, r.output_len) for r in rows),
                  key=lambda r: r.arrival_s)


def write_sample_traces(out_dir: str | Path, n: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Small sample traces in both formats, generated from the `mixed` workload."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    requests = synthetic("mixed", n, rate_per_s=2.0, seed=seed)
    start = datetime(2026, 1, 1)
    azure, mooncake = out / "azure_sample.csv", out / "mooncake_sample.jsonl"
    with open(azure, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
        for r in requests:
            stamp = start + timedelta(seconds=r.arrival_s)
            writer.writerow([stamp.strftime("%Y-%m-%d %H:%M:%S.%f"), r.prompt_len, r.output_len])
    with open(mooncake, "w") as f:
        for i, r in enumerate(requests):
            f.write(json.dumps({"timestamp": int(r.arrival_s * 1e3), "input_length": r.prompt_len,
                                "output_length": r.output_len, "hash_ids": [i]}) + "\n")
    return azure, mooncake
