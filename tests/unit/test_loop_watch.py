"""LoopWatch: a stalled event loop is reported with how long, why (busy or blocked) and
where; a loop that keeps running is not."""

from __future__ import annotations

import asyncio
import time

from runtime.loop_watch import LoopWatch


def _blocking_sleep(seconds: float) -> None:
    time.sleep(seconds)  # a blocking system call on the loop's thread


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def _watched(stall: object, seconds: float) -> LoopWatch:
    watch = LoopWatch("test", stall_s=0.1, period_s=0.02)
    watch.start()
    await asyncio.sleep(0.1)
    stall(seconds)  # type: ignore[operator]
    await asyncio.sleep(0.1)  # the first heartbeat after it records the stall
    watch.stop()
    return watch


def test_a_blocking_call_is_reported_with_its_stack_and_an_idle_thread() -> None:
    watch = asyncio.run(_watched(_blocking_sleep, 0.5))
    assert watch.num_stalls == 1
    (stall,) = watch.stalls
    assert 400 < stall.stalled_ms < 2000
    assert stall.loop_cpu_ms < 0.5 * stall.stalled_ms  # blocked, not computing
    assert "_blocking_sleep" in stall.loop_stack
    assert "asyncio/base_events.py" not in stall.loop_stack  # asyncio's plumbing left out


def test_busy_python_on_the_loop_is_reported_with_the_cpu_it_used() -> None:
    watch = asyncio.run(_watched(_busy, 0.5))
    assert watch.num_stalls == 1
    (stall,) = watch.stalls
    assert stall.loop_cpu_ms > 0.3 * stall.stalled_ms
    assert stall.process_cpu_ms >= stall.loop_cpu_ms - 1.0
    assert "_busy" in stall.loop_stack


def test_a_loop_that_keeps_running_reports_nothing() -> None:
    async def awaits() -> LoopWatch:
        watch = LoopWatch("test", stall_s=0.1, period_s=0.02)
        watch.start()
        for _ in range(20):
            await asyncio.sleep(0.02)
            _busy(0.01)  # short callbacks, each well under the stall threshold
        watch.stop()
        return watch

    watch = asyncio.run(awaits())
    assert watch.num_stalls == 0
    assert not watch.stalls


def test_a_garbage_collection_during_a_stall_is_timed() -> None:
    import gc

    def collect(seconds: float) -> None:
        garbage = [[i] for i in range(300_000)]  # objects for the collector to walk
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            gc.collect()
        del garbage

    watch = asyncio.run(_watched(collect, 0.4))
    (stall,) = watch.stalls
    assert 0 < stall.gc_ms <= stall.stalled_ms + 100
    assert stall.gc_ms > 0.3 * stall.stalled_ms  # the stall was mostly collections


def test_a_stall_is_written_through_a_buffering_handler_at_once() -> None:
    """Serve's replica log is a MemoryHandler of 1,000 records in throughput-optimized mode:
    a stall's warning must not wait in it (a killed process loses the buffer)."""
    import logging
    import logging.handlers

    from runtime.loop_watch import logger

    class _Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    target = _Keep()
    buffered = logging.handlers.MemoryHandler(capacity=1000, target=target,
                                              flushLevel=logging.ERROR)
    logger.addHandler(buffered)
    try:
        asyncio.run(_watched(_blocking_sleep, 0.4))
    finally:
        logger.removeHandler(buffered)
    assert any("stood still" in message for message in target.messages)
