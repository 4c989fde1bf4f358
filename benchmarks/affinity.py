"""Pinning running vLLM engines to cores from outside, for setups that give every engine the
same environment (Ray Serve LLM: one runtime_env for all replicas of a deployment).

An engine is a VLLM::EngineCore process with its descendants (with the `mp` executor, as Ray
Serve LLM uses on CPU, the model runs in a VLLM::Worker child). Every thread of each is pinned
with sched_setaffinity (per thread: Linux affinity is per thread; threads started later inherit
their creator's). Engines are taken in pid order, engine i to core set i.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

ENGINE_CORE_PREFIX = "VLLM::EngineCore"


def parse_core_set(text: str) -> set[int]:
    """vLLM's core-list syntax for one engine: "3", "2-3" or "0|2-3" (| for a list, since
    commas separate engines on our command lines)."""
    cores: set[int] = set()
    for part in text.replace("|", ",").split(","):
        first, _, last = part.strip().partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    assert cores, f"empty core set {text!r}"
    return cores


@dataclass(frozen=True)
class PinnedEngine:
    engine_pid: int
    cores: frozenset[int]
    num_threads: int
    num_threads_off: int  # threads whose affinity, read back, is not `cores`


def pin_engines(root_pids: list[int], core_sets: tuple[str, ...]) -> list[PinnedEngine]:
    """Pin engine i (in pid order) under the root processes to core_sets[i]; assert that
    there are exactly as many engines as core sets."""
    engines = []
    for root_pid in root_pids:
        for proc in psutil.Process(root_pid).children(recursive=True):
            try:
                if proc.name().startswith(ENGINE_CORE_PREFIX):
                    engines.append(proc)
            except psutil.Error:
                continue
    engines.sort(key=lambda p: p.pid)
    assert len(engines) == len(core_sets), (
        f"found {len(engines)} engine processes for {len(core_sets)} core sets")
    return [_pin_tree(engine, frozenset(parse_core_set(cores)))
            for engine, cores in zip(engines, core_sets, strict=True)]


def _pin_tree(engine: psutil.Process, cores: frozenset[int]) -> PinnedEngine:
    thread_ids = []
    for proc in [engine, *engine.children(recursive=True)]:
        try:
            thread_ids += [thread.id for thread in proc.threads()]
        except psutil.Error:
            continue
    num_off = 0
    for tid in thread_ids:
        try:
            os.sched_setaffinity(tid, cores)
            num_off += os.sched_getaffinity(tid) != cores
        except ProcessLookupError:
            continue  # a thread that ended meanwhile
    return PinnedEngine(engine.pid, cores, len(thread_ids), num_off)
