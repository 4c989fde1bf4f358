"""What the split path costs beyond the prefill itself, learned from the requests that took it.

A split request's first token comes back over one more hop than a local one's (ingress ->
prefill replica -> ingress), and its KV reaches the decode replica after a transfer whose
fixed part (the lease reaches the producer's worker with its engine's next step; the pull's
round trips) outweighs its bytes over the link for all but long prompts. Both start from the
configured figures (`split_overhead_ms`; `transfer_latency_ms` + bytes / `link_bytes_per_s`)
and follow the measured ones: the first token's time beyond the prefill engine's own queue
and compute, and the transfer's time beyond its bytes, each an exponentially weighted mean
(a slow minute moves them, and passes). The bytes term stays the configured one: short
prompts, where the fixed part dominates, say nothing about the link's speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.scheduler.policy import PolicyConfig

WEIGHT = 0.1  # of the newest request in each mean
MAX_SAMPLE_MS = 1000.0  # one request moves a mean at most this far (a stalled call is no hop)


@dataclass
class Handoff:
    first_ms: float  # the split's first token beyond the prefill engine's queue and compute
    latency_ms: float  # the transfer's time beyond its bytes over the link
    kv_bytes_per_token: int
    link_bytes_per_s: float
    num_samples: int = 0

    @classmethod
    def of(cls, config: PolicyConfig) -> Handoff:
        return cls(config.split_overhead_ms, config.transfer_latency_ms,
                   config.kv_bytes_per_token, config.link_bytes_per_s)

    def bytes_ms(self, num_tokens: int) -> float:
        return 1e3 * num_tokens * self.kv_bytes_per_token / self.link_bytes_per_s

    def transfer_ms(self, num_tokens: int) -> float:
        """The predicted time from a split's first token to its KV on the decode replica."""
        return self.latency_ms + self.bytes_ms(num_tokens)

    def observe(self, first_over_ms: float | None, num_tokens: int,
                transfer_ms: float) -> None:
        """A split request's measured hop: its first token beyond the prefill engine's queue
        and compute (None: it did not run alone there, below), and the transfer the decode
        replica waited for (0: not measured). A prompt sent to an engine in the middle of
        another's step reaches the engine's queue only when that step ends: that wait is
        the engine's work ahead of it, which the prefill model predicts, not the hop."""
        if first_over_ms is not None:
            self.first_ms += WEIGHT * (_clip(first_over_ms) - self.first_ms)
        if transfer_ms > 0:
            fixed = transfer_ms - self.bytes_ms(num_tokens)
            self.latency_ms += WEIGHT * (_clip(fixed) - self.latency_ms)
        self.num_samples += 1

    def snapshot(self) -> dict[str, float]:
        return {"first_token_ms": self.first_ms, "transfer_latency_ms": self.latency_ms,
                "samples": self.num_samples}


def _clip(ms: float) -> float:
    return min(max(ms, 0.0), MAX_SAMPLE_MS)
