"""Values the ingress's request path passes around (no Ray, no engine imports)."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.pipeline import Lane, PhaseTimings
from runtime.requests import GenerateRequest
from runtime.scheduler.types import Decision


@dataclass(frozen=True)
class PreparedRequest:
    request: GenerateRequest
    lane: Lane
    arrival_s: float
    decision: Decision | None = None  # None: Serve's own routing, always disaggregated


@dataclass(frozen=True)
class TextEvent:
    """Text the client can be sent now, the token ids it came from; the last event of a
    request carries its finish reason (and stop string, if one ended it) and timings."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    timings: PhaseTimings | None = None
    stop_reason: str | int | None = None
