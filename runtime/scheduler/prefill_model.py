"""How long an engine takes to prefill a prompt: t(n) = a + b*n + c*n^2 milliseconds.

n is the prompt's uncached tokens (a cached prefix of p tokens adds the attention of the new
tokens against it: c * 2 * n * p). b is the weights' cost per token (matmuls), c the
attention's, which is what makes a long prefill quadratic: a linear tokens-per-second model
predicted 0.2 s for a 7,663-token prompt that took 5.2 s. a is the fixed cost per request.

`PrefillFit` keeps recent samples (measured prefill times of prompts that ran alone on the
engine, and a calibration at start) in log-spaced length buckets, so thousands of short prompts
do not push out the few long ones that pin down c, and refits by least squares on the relative
error (a 2x error matters as much at 100 tokens as at 8,000), with no negative coefficient.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrefillModel:
    a_ms: float
    b_ms: float  # per token
    c_ms: float  # per token^2

    def predict_ms(self, num_tokens: float, num_cached: float = 0.0) -> float:
        n = max(0.0, num_tokens)
        return self.a_ms + self.b_ms * n + self.c_ms * n * (n + 2.0 * num_cached)

    def chunk_ms(self, position: float, num_tokens: float) -> float:
        """The marginal cost of num_tokens more prompt tokens at `position` (one chunk of a
        chunked prefill, without the per-request cost)."""
        return self.b_ms * num_tokens + self.c_ms * num_tokens * (num_tokens + 2.0 * position)

    @classmethod
    def from_throughput(cls, tokens_per_s: float, a_ms: float = 5.0) -> PrefillModel:
        """A first guess before any measurement: linear at tokens_per_s."""
        return cls(a_ms, 1e3 / tokens_per_s, 0.0)


class PrefillFit:
    """Samples (uncached tokens, ms) and the model they fit."""

    NUM_PER_BUCKET = 12

    def __init__(self, prior: PrefillModel) -> None:
        self.model = prior
        self._buckets: dict[int, deque[tuple[float, float]]] = {}

    def add(self, num_tokens: float, ms: float, refit: bool = True) -> None:
        if num_tokens < 1 or not (ms > 0) or not math.isfinite(ms):
            return
        bucket = int(math.log2(num_tokens) * 2)
        samples = self._buckets.setdefault(bucket, deque(maxlen=self.NUM_PER_BUCKET))
        samples.append((float(num_tokens), float(ms)))
        if refit:
            self.refit()

    @property
    def num_samples(self) -> int:
        return sum(len(s) for s in self._buckets.values())

    def refit(self) -> None:
        samples = [s for bucket in self._buckets.values() for s in bucket]
        fitted = fit(samples)
        if fitted is not None:
            self.model = fitted


def fit(samples: list[tuple[float, float]]) -> PrefillModel | None:
    """Least squares on relative error over (tokens, ms) samples, every coefficient >= 0 (the
    best of the non-negative fits on each subset of the terms). None with too few samples."""
    if len(samples) < 2:
        return None
    n = np.array([s[0] for s in samples])
    t = np.array([s[1] for s in samples])
    features = np.stack([np.ones_like(n), n, n * n], axis=1) / t[:, None]
    target = np.ones_like(t)
    best: tuple[float, np.ndarray] | None = None
    for size in (3, 2, 1):
        for terms in itertools.combinations(range(3), size):
            if len(samples) < size:
                continue
            x = features[:, terms]
            coef, *_ = np.linalg.lstsq(x, target, rcond=None)
            if (coef < 0).any():
                continue
            error = float(np.sum((x @ coef - target) ** 2))
            if best is None or error < best[0] - 1e-12:
                full = np.zeros(3)
                full[list(terms)] = coef
                best = (error, full)
        if best is not None and size == 3:
            break  # the full model is non-negative: no subset fits better
    if best is None:
        return None
    a, b, c = (float(v) for v in best[1])
    return PrefillModel(a, b, c)
