"""Event-loop stall watch: reports when a process's asyncio loop ran no callback for longer
than `stall_s`, and says why, so a slow request can be told from a stalled front-end.

A replica's front-end (vLLM's output handler, the direct-call server, the KV handshakes) and
the ingress each run on one event loop; while something blocks it, every request on that
process waits, however fast the engine is. Seen in benchmarks: a prefill replica's calls
returned 1.7 s after its engine had produced the first token, with nothing in the logs.

Lifecycle:
  1. `start()` on the loop to watch: a heartbeat callback runs every `period_s` and records
     the time, the loop thread's CPU time and the process's CPU time.
  2. A daemon thread wakes every `period_s`; once the heartbeat is `stall_s` overdue it takes
     one sample of what the loop thread is running (its stack) and of every other thread's
     innermost frames.
  3. The first heartbeat after the stall logs one warning: how long the loop stood still,
     how much CPU its thread and the whole process used meanwhile (the loop's thread busy
     for the whole stall: Python code or a C call on the loop; idle: a blocking system call
     or the GIL held by another thread; the process idle as well: it was not scheduled),
     how long the process's garbage collections took meanwhile, whether the watch thread
     itself woke late (the GIL held, or the process off-CPU), and the sampled stacks.
     `stalls` keeps the latest few for status calls.
  4. `stop()` ends both.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import sys
import threading
import time
import traceback
import types
from dataclasses import dataclass

logger = logging.getLogger("ray.serve")  # into the replica's log, where its requests are

STALL_S = 0.25
PERIOD_S = 0.05
NUM_KEPT = 16
_STACK_DEPTH = 12
_ASYNCIO_DIR = asyncio.__file__.rsplit("/", 1)[0]


@dataclass(frozen=True)
class LoopStall:
    """One stall of the watched loop, as measured when it ended."""

    stalled_ms: float
    loop_cpu_ms: float  # CPU time of the loop's thread during the stall
    process_cpu_ms: float  # CPU time of the whole process (all threads) during it
    watch_late_ms: float  # how late the watch thread itself woke during it (0: on time)
    gc_ms: float  # the process's garbage collections during it (they hold the GIL)
    loop_stack: str  # what the loop thread ran, sampled during the stall ("" if unsampled)
    other_threads: str  # innermost frames of the other threads at that moment


class LoopWatch:
    """Watches the running event loop of the caller of `start()`; see the module docstring."""

    def __init__(self, name: str, stall_s: float = STALL_S, period_s: float = PERIOD_S) -> None:
        assert 0 < period_s < stall_s, "the heartbeat must be more frequent than a stall"
        self.name = name
        self.stall_s = stall_s
        self.period_s = period_s
        self.stalls: collections.deque[LoopStall] = collections.deque(maxlen=NUM_KEPT)
        self.num_stalls = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id = 0
        self._beat_at = 0.0  # monotonic time of the last heartbeat
        self._beat_cpu_s = 0.0  # the loop thread's CPU time then
        self._beat_process_s = 0.0
        self._sample: tuple[str, str] | None = None  # taken by the watch thread
        self._watch_late_s = 0.0
        self._gc_s = 0.0  # garbage collection time since the last heartbeat
        self._gc_started = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        gc.callbacks.append(self._on_gc)
        self._beat()
        self._thread = threading.Thread(target=self._watch, name=f"loop-watch-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.monotonic()
        elif self._gc_started:
            self._gc_s += time.monotonic() - self._gc_started
            self._gc_started = 0.0

    def _beat(self) -> None:
        now = time.monotonic()
        cpu_s = time.thread_time()
        process_s = time.process_time()
        gap_s = now - self._beat_at
        if self._beat_at and gap_s - self.period_s > self.stall_s:
            self._record(gap_s, cpu_s, process_s)
        self._watch_late_s = self._gc_s = 0.0
        self._beat_at, self._beat_cpu_s, self._beat_process_s = now, cpu_s, process_s
        if not self._stopped.is_set() and self._loop is not None:
            self._handle = self._loop.call_later(self.period_s, self._beat)

    def _record(self, gap_s: float, cpu_s: float, process_s: float) -> None:
        loop_stack, others = self._sample or ("", "")
        self._sample = None
        stall = LoopStall(
            stalled_ms=(gap_s - self.period_s) * 1e3,
            loop_cpu_ms=(cpu_s - self._beat_cpu_s) * 1e3,
            process_cpu_ms=(process_s - self._beat_process_s) * 1e3,
            watch_late_ms=self._watch_late_s * 1e3, gc_ms=self._gc_s * 1e3,
            loop_stack=loop_stack, other_threads=others)
        self.stalls.append(stall)
        self.num_stalls += 1
        logger.warning(
            "event loop of %s stood still for %.0f ms: its thread used %.0f ms of CPU, the "
            "process %.0f ms; garbage collection took %.0f ms; the watch thread woke up to "
            "%.0f ms late.\nloop thread:\n%sother threads:\n%s", self.name,
            stall.stalled_ms, stall.loop_cpu_ms, stall.process_cpu_ms, stall.gc_ms,
            stall.watch_late_ms, loop_stack or "  (not sampled)\n",
            others or "  (not sampled)\n")
        for handler in logger.handlers:  # Serve buffers its replica logs (1,000 records when
            handler.flush()  # throughput-optimized): a process killed later would lose it

    def _watch(self) -> None:
        due = time.monotonic() + self.period_s
        while not self._stopped.wait(self.period_s):
            woke = time.monotonic()
            self._watch_late_s = max(self._watch_late_s, woke - due)
            due = woke + self.period_s
            if woke - self._beat_at - self.period_s > self.stall_s and self._sample is None:
                self._sample = self._take_sample()

    def _take_sample(self) -> tuple[str, str]:
        frames = sys._current_frames()
        loop_frame = frames.get(self._loop_thread_id)
        loop_stack = "".join(traceback.format_list(_own_frames(loop_frame))
                             ) if loop_frame is not None else ""
        names = {t.ident: t.name for t in threading.enumerate()}
        others = []
        for ident, frame in frames.items():
            if ident in (self._loop_thread_id, threading.get_ident()):
                continue
            top = traceback.extract_stack(frame, limit=2)
            where = " <- ".join(f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})"
                                for f in reversed(top))
            others.append(f"  {names.get(ident, ident)}: {where}\n")
        return loop_stack, "".join(others)


def _own_frames(frame: types.FrameType) -> list[traceback.FrameSummary]:
    """The innermost frames of a stack, less asyncio's own (the loop's run_forever and
    callback plumbing say nothing about what blocked it)."""
    frames = [f for f in traceback.extract_stack(frame)
              if not f.filename.startswith(_ASYNCIO_DIR)]
    return frames[-_STACK_DEPTH:]
