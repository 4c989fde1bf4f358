"""CPU time of a serving setup's process trees, by role, between two snapshots.

Every process under the target's root processes (and the roots themselves) is read with psutil
(user + system time). A process is put in a role by its name or command line:
  engine       vLLM's engine core and workers (VLLM::EngineCore, VLLM::Worker...)
  api_server   vLLM's OpenAI server (plain vLLM, Ray Serve LLM's replicas are `replica`)
  proxy        Ray Serve's HTTP proxy actor
  ingress      our ingress replica (the global scheduler; HTTP and gRPC APIs), or Ray Serve
               LLM's OpenAI ingress (OpenAiIngress)
  replica      a pool replica, or a Ray Serve LLM LLMServer replica (engine front-end: AsyncLLM,
               output processing, Ray calls)
  serve_ctl    Ray Serve's controller
  ray_system   Ray's own daemons (GCS, raylet, dashboard, agents, log monitor)
  driver       the command that started the target (`disagg serve`)
  other        anything else
Processes that exit between snapshots lose their time (psutil cannot read a dead process);
the roles above all live for the whole run.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import psutil

ROLES = ("engine", "api_server", "proxy", "ingress", "replica", "serve_ctl", "ray_system",
         "driver", "other")
# Serve replicas are titled ray::ServeReplica:<app>:<deployment>
_SERVE_REPLICA = re.compile(r"ServeReplica:[^:\s]+:(\S+)")
INGRESS_DEPLOYMENTS = ("Ingress", "OpenAiIngress")  # ours; Ray Serve LLM's
_RAY_DAEMONS = ("gcs_server", "raylet", "dashboard", "agent", "log_monitor", "monitor.py",
                "ray_client_server", "runtime_env")


def role_of(name: str, cmdline: str, is_root: bool) -> str:
    """The role of one process, from its name (proctitle) and command line."""
    if name.startswith("VLLM::") or "VLLM::" in cmdline[:64]:
        return "engine"
    if "vllm.entrypoints.openai.api_server" in cmdline:
        return "api_server"
    if "ProxyActor" in cmdline:
        return "proxy"
    if "ServeController" in cmdline:
        return "serve_ctl"
    replica = _SERVE_REPLICA.search(cmdline)
    if replica:
        return "ingress" if replica.group(1) in INGRESS_DEPLOYMENTS else "replica"
    head = f"{name} {cmdline[:200]}".lower()  # ray::DashboardAgent, ray::TelemetryAgent...
    if any(daemon in head for daemon in _RAY_DAEMONS):
        return "ray_system"
    if is_root:
        return "driver"
    return "other"


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds per process (pid, create_time) with its role."""

    seconds: dict[tuple[int, float], float]
    roles: dict[tuple[int, float], str]


def snapshot(root_pids: list[int]) -> CpuSnapshot:
    seconds: dict[tuple[int, float], float] = {}
    roles: dict[tuple[int, float], str] = {}
    for root_pid in root_pids:
        try:
            root = psutil.Process(root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    times = proc.cpu_times()
                    name = proc.name()
                    cmdline = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            seconds[key] = times.user + times.system
            roles[key] = role_of(name, cmdline, proc.pid == root_pid)
    return CpuSnapshot(seconds, roles)


def cpu_by_role(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds spent by each role between the two snapshots (processes started in
    between count from zero)."""
    used: Counter[str] = Counter()
    for key, seconds in after.seconds.items():
        used[after.roles[key]] += max(0.0, seconds - before.seconds.get(key, 0.0))
    return {role: round(used[role], 3) for role in ROLES if used[role] > 0}
