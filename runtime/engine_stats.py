"""Live load of one vLLM engine, read from vLLM's public stat-logger hook.

vLLM hands every custom stat logger its scheduler's stats after each step (KV cache usage,
running and waiting requests). `LoadProbe` keeps the latest as an `EngineLoad`: the leak checks
read it now, and the global scheduler will place requests by it. `CostProbe` hands each step's
duration and batch to a CostTracker (what each request cost).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.v1.metrics.loggers import StatLoggerBase

from runtime.cost_tracker import CostTracker, StepCounts

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


class CostProbe:
    """Feeds a CostTracker (runtime/cost_tracker.py) every engine step's duration and what it
    scheduled; pass `factory` to AsyncLLM. vLLM measures and reports each step only when the
    engine runs with enable_logging_iteration_details (build_engine sets it for a probe)."""

    def __init__(self, tracker: CostTracker) -> None:
        self.tracker = tracker

    def factory(self, vllm_config: VllmConfig, engine_index: int = 0) -> StatLoggerBase:
        return _CostLogger(self.tracker, vllm_config, engine_index)


class _CostLogger(StatLoggerBase):
    def __init__(self, tracker: CostTracker, vllm_config: VllmConfig,
                 engine_index: int = 0) -> None:
        self._tracker = tracker
        # with the "uni" executor the model runs before vLLM starts its step timer
        self._timed = vllm_config.parallel_config.distributed_executor_backend != "uni"

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        details = getattr(scheduler_stats, "iteration_details", None)
        if details is None or details.is_dummy:
            return
        self._tracker.on_step(StepCounts(
            duration_s=details.elapsed_ms / 1e3 if self._timed else None,
            num_prefill_requests=details.num_ctx_requests,
            num_prefill_tokens=details.num_ctx_tokens,
            num_decode_requests=details.num_generation_requests,
        ))

    def log_engine_initialized(self) -> None:
        self._tracker.restart_clock()


class DropIterationLines(logging.Filter):
    """vLLM's own logging stat logger writes a line per step once iteration details are on;
    the cost probe needs the details, nobody needs the lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("%sIteration(")

    @classmethod
    def install(cls) -> None:
        target = logging.getLogger("vllm.v1.metrics.loggers")
        if not any(isinstance(f, cls) for f in target.filters):
            target.addFilter(cls())
