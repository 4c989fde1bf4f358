"""Benchmark workloads: open-loop arrival schedules of (prompt length, output length), seeded.

Synthetic families (`WORKLOADS` describes each): `mixed` (bimodal), `short`, `long`, `continuum`
(log-normal prompt lengths with a heavy tail), `rag` (many 1-4K prompts), `chat_rag`, `bursty`
(gamma arrivals), `long_output` (decode-heavy). Traces: the Azure LLM inference trace CSV
(TIMESTAMP, ContextTokens, GeneratedTokens) and the Mooncake trace JSONL (timestamp in ms,
input_length, output_length). `write_sample_traces` makes small files of both formats; nothing
is downloaded.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

WorkloadName = Literal["mixed", "short", "long", "continuum", "rag", "chat_rag", "bursty",
                       "long_output"]
WORKLOADS: dict[str, str] = {
    "mixed": "bimodal: 90% short (prompt 64-512, output 16-128), 10% long (prompt 50-90% of "
             "the context, output 16-64)",
    "short": "the short half of mixed only",
    "long": "the long half of mixed only",
    "continuum": "log-normal prompt lengths (median 400 tokens, heavy tail up to 90% of the "
                 "context), log-normal outputs (median 48, 8-256)",
    "rag": "retrieval-augmented: 70% prompts of 1-4K tokens, 30% chat prompts of 64-512; "
           "outputs 16-192",
    "chat_rag": "chat + RAG: 80% prompts of 16-900 tokens, 17% of 1,500-4,000, 3% of "
                "6,000-9,000 (capped at 90% of the context); outputs 8-256",
    "bursty": "the continuum's sizes with bursty arrivals (gamma gaps, shape 0.25: bursts "
              "and lulls at the same mean rate)",
    "long_output": "decode-heavy chat: prompts 64-512, outputs 128-512",
}
BURSTY_SHAPE = 0.25


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


def _lognormal_int(rng: random.Random, median: float, sigma: float, low: int,
                   high: int) -> int:
    return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))


def _sizes(name: WorkloadName, rng: random.Random, max_context: int,
           long_fraction: float) -> tuple[int, int]:
    """(prompt, output) of one request of the named family."""
    top = int(0.9 * max_context)
    if name in ("continuum", "bursty"):
        return (_lognormal_int(rng, 400, 1.3, 16, top), _lognormal_int(rng, 48, 0.9, 8, 256))
    if name == "rag":
        prompt = rng.randint(1000, 4000) if rng.random() < 0.7 else rng.randint(64, 512)
        return min(prompt, top), rng.randint(16, 192)
    if name == "chat_rag":
        u = rng.random()
        prompt = rng.randint(16, 900) if u < 0.80 else rng.randint(1500, 4000) if u < 0.97 \
            else rng.randint(6000, 9000)
        return min(prompt, top), rng.randint(8, 256)
    if name == "long_output":
        return rng.randint(64, 512), rng.randint(128, 512)
    is_long = name == "long" or (name == "mixed" and rng.random() < long_fraction)
    if is_long:
        return rng.randint(int(0.5 * max_context), top), rng.randint(16, 64)
    return rng.randint(64, 512), rng.randint(16, 128)


def synthetic(name: WorkloadName, n: int, rate_per_s: float, *, max_context: int = 16384,
              long_fraction: float = 0.1, burstiness: float = 1.0,
              seed: int = 0) -> list[BenchRequest]:
    """`n` requests of a family (WORKLOADS) at `rate_per_s`, sized for `max_context`."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    rng = random.Random(seed)
    shape = BURSTY_SHAPE if name == "bursty" and burstiness == 1.0 else burstiness
    times = arrivals(n, rate_per_s, shape, rng)
    out = []
    for t in times:
        prompt, output = _sizes(name, rng, max_context, long_fraction)
        out.append(BenchRequest(t, prompt, max(1, min(output, max_context - prompt))))
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
