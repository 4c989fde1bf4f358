"""How long one decode step of an engine takes: t(B) = s0 + s1*B milliseconds, B sequences.

s0 is what a step costs whatever its batch (the weights read once, the step's fixed
overheads), s1 what each sequence adds (its rows of every matmul, its attention, its share
of scheduling and output processing). A sequence placed on an engine slows every step there
by s1 for as long as it decodes: where a request decodes decides its own time per token and
that of every sequence already there, not only its first token.

The replica fits s0 and s1 to its engine's decode-only steps, each step's time being the
interval between its output and the one before (what a token takes, not only the model's
forward pass), by least squares with exponential forgetting, and reports them. Until batch
sizes have varied enough to tell the two apart, the scheduler takes the engine's prefill
model's a and b (a decode step of B sequences computes B tokens); after that, a stretch of
steady batches moves s0 only (the per-sequence cost is the hardware's; the level is what
else runs on the engine's core).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeStepModel:
    s0_ms: float
    s1_ms: float  # per sequence in the batch

    def step_ms(self, num_seqs: float) -> float:
        return self.s0_ms + self.s1_ms * num_seqs


class DecodeStepFit:
    """Weighted sums of (batch, ms) over an engine's decode-only steps, the older the less."""

    FORGET = 0.998  # per step: about the last 500 steps count (seconds of decoding)
    MIN_STEPS = 20.0  # weight of steps before a model is given
    # batch sizes must spread this much (variance, sequences^2) to tell s0 from s1 apart: over
    # a narrower spread the noise of a shared core makes the slope anything from 0 to 3x
    # (seen on two cores with one to three sequences); calibration's batches 1, 4, 8 have 8
    MIN_BATCH_VARIANCE = 2.0

    def __init__(self) -> None:
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self._slope: float | None = None  # the last s1 the batches could tell

    def add(self, num_seqs: int, ms: float) -> None:
        if num_seqs < 1 or not (ms > 0) or not math.isfinite(ms):
            return
        f = self.FORGET
        self._w = f * self._w + 1.0
        self._x = f * self._x + num_seqs
        self._y = f * self._y + ms
        self._xx = f * self._xx + num_seqs * num_seqs
        self._xy = f * self._xy + num_seqs * ms
        mean_x = self._x / self._w
        var_x = self._xx / self._w - mean_x * mean_x
        if self._w >= self.MIN_STEPS and var_x >= self.MIN_BATCH_VARIANCE:
            cov = self._xy / self._w - mean_x * self._y / self._w
            self._slope = max(0.0, cov / var_x)

    @property
    def model(self) -> DecodeStepModel | None:
        """The fit; None before MIN_STEPS, or while the batch sizes seen never varied enough.
        Neither coefficient is negative: a slope below 0 (noise over a narrow range of
        batches) is a flat step, an intercept below 0 puts all of a step on its sequences."""
        if self._slope is None:
            return None
        mean_x, mean_y = self._x / self._w, self._y / self._w
        s0 = mean_y - self._slope * mean_x
        if s0 < 0:
            return DecodeStepModel(0.0, mean_y / mean_x)
        return DecodeStepModel(s0, self._slope)
