"""Live load of one vLLM engine, read from vLLM's public stat-logger hook.

vLLM hands every custom stat logger its scheduler's stats after each step (KV cache usage,
running and waiting requests). `LoadProbe` keeps the latest as an `EngineLoad`: the leak checks
read it now, and the global scheduler will place requests by it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.v1.metrics.loggers import StatLoggerBase

if TYPE_CHECKING:
    from vllm.config import VllmConfig


@dataclass(frozen=True)
class EngineLoad:
    kv_cache_usage: float  # fraction of KV blocks held by requests (0.0 - 1.0)
    num_running: int
    num_waiting: int
    measured_at_s: float  # time.monotonic() of the step that reported it


class LoadProbe:
    """Holds the latest EngineLoad of one engine; pass `factory` to AsyncLLM."""

    def __init__(self) -> None:
        self.latest: EngineLoad | None = None

    def factory(self, vllm_config: VllmConfig, engine_index: int = 0) -> StatLoggerBase:
        return _ProbeLogger(self, vllm_config, engine_index)


class _ProbeLogger(StatLoggerBase):
    def __init__(self, probe: LoadProbe, vllm_config: VllmConfig, engine_index: int = 0) -> None:
        self._probe = probe

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is None:
            return
        self._probe.latest = EngineLoad(
            kv_cache_usage=float(scheduler_stats.kv_cache_usage),
            num_running=int(scheduler_stats.num_running_reqs),
            num_waiting=int(scheduler_stats.num_waiting_reqs),
            measured_at_s=time.monotonic(),
        )

    def log_engine_initialized(self) -> None:
        return
