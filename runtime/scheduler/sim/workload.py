"""Request streams for the simulator: synthetic mixes (seeded) and trace files."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_len: int
    output_len: int


def mixed(num_requests: int, rate_per_s: float, long_fraction: float = 0.05,
          long_range: tuple[int, int] = (32_768, 131_072), seed: int = 0) -> list[TraceRequest]:
    """Mostly short chat (prompts ~ lognormal around 600 tokens, outputs ~200) plus a fraction of
    long-context prompts; Poisson arrivals."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(num_requests):
        t += rng.expovariate(rate_per_s)
        if rng.random() < long_fraction:
            prompt = rng.randint(*long_range)
            output = max(1, int(rng.lognormvariate(5.0, 0.5)))
        else:
            prompt = min(8000, max(8, int(rng.lognormvariate(6.4, 0.8))))
            output = min(2000, max(1, int(rng.lognormvariate(5.2, 0.6))))
        out.append(TraceRequest(t, prompt, output))
    return out


def read_trace(path: str | Path) -> list[TraceRequest]:
    """CSV rows of timestamp (s), input length, output length; a header row is skipped."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or not row[0].replace(".", "", 1).isdigit():
                continue
            rows.append(TraceRequest(float(row[0]), int(row[1]), int(row[2])))
    rows.sort(key=lambda r: r.arrival_s)
    return rows
