"""`disagg serve`, `disagg status` and the Ray demo: the runtime as users start and inspect it."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.app_config import AppConfig
from runtime.engines import free_port


def serve_env(config: AppConfig) -> dict[str, str]:
    """Ray Serve settings for the controller and every replica. With `server.direct_ingress`,
    Serve's throughput-optimized mode: the ingress replica serves HTTP itself on
    server.http_port (no proxy hop per streamed chunk), handles call replicas over gRPC, and
    user code runs on the replica's own event loop."""
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    env.update({name: os.environ.get(name, value) for name, value in LEAN_SERVE_ENV.items()})
    if config.server.direct_ingress:
        port = config.server.http_port
        env.update({
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
            # the ingress drains this long on shutdown, for load balancers in front of many
            # ingress replicas (Ray's default: 30 s); clients here talk to it directly
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        })
    if config.prefill.autoscaling is not None or config.decode.autoscaling is not None:
        # Pool replicas hand the scheduler's demand to Serve's autoscaler as a custom metric
        # (record_autoscaling_stats). Serve's replicas only push those when they also collect
        # their running requests themselves; by default the handles collect those, and a
        # replica's metrics pusher then never starts (Ray 2.60), so the autoscaler saw no
        # demand at all.
        env["RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE"] = "0"
    return env


WORKER_NICENESS_ENV = "RAY_worker_niceness"  # Ray's config for its workers' niceness (15)

# What Serve and Ray spend with no request in flight is taken from the engines on a small
# machine. Measured here (colocated, two replicas, idle, CPU-seconds per second of every
# non-engine process): 0.20 with Ray's defaults, 0.13 with these. Each can be overridden from
# the environment.
LEAN_SERVE_ENV = {  # read by Serve's controller and replicas (passed in their runtime_env)
    # the controller's reconcile loop (0.1 s): 0.039 -> 0.015 CPU-s/s; scaling and
    # replica-state changes are acted on within 0.5 s
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # each replica exports its cached request metrics every 0.1 s by default
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}
LEAN_RAY_ENV = {  # read by Ray's daemons and workers when they start: a Ray we start
    # task events for every actor call (each Serve request), kept for the dashboard's and
    # `ray list tasks`' views: GCS 0.020 -> 0.008 CPU-s/s; those views stay empty
    "RAY_task_events_report_interval_ms": "0",
    # no pool of idle Python workers kept warm (0.008 CPU-s/s each): every process of ours
    # is an actor started once
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
}


def start_app(config: AppConfig, address: str | None,
              on_ray_up: Callable[[], None] | None = None) -> str:
    """Start (or join) Ray, run the app, return the HTTP base URL. `on_ray_up` runs once Ray
    is up (Ray installs its own signal handlers there; a caller's go after them)."""
    import ray
    from ray import serve

    from runtime.app import build_app

    env = serve_env(config)
    os.environ.update(env)
    runtime_env = {"env_vars": env}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        # Ray starts its workers at niceness 15, and the vLLM engines our replicas spawn
        # inherit it: any Ray daemon (nice 0) on an engine's core then takes the core from the
        # engine. Our workers are the engines' parents: nice 0, as a plain vLLM server runs.
        os.environ.setdefault(WORKER_NICENESS_ENV, "0")
        for name, value in LEAN_RAY_ENV.items():
            os.environ.setdefault(name, value)
        # "local": a new Ray of our own, never one some earlier `ray start` left behind
        ray.init(address="local", include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=False)
    if on_ray_up is not None:
        on_ray_up()
    server = config.server
    # With direct ingress Serve's proxy still runs, on a port of its own; clients use the
    # ingress's port.
    proxy_port = free_port(server.host) if server.direct_ingress else server.http_port
    serve.start(http_options={"host": server.host, "port": proxy_port},
                controller_options={"runtime_env": runtime_env})
    print(f"[serve] starting {config.prefill.replicas} prefill and {config.decode.replicas} "
          "decode replica(s); each loads a vLLM engine (30-60 s on a CPU)", flush=True)
    start = time.perf_counter()
    serve.run(build_app(config), name=server.app_name, route_prefix="/")
    url = f"http://{server.host}:{server.http_port}"
    print(f"[serve] up in {time.perf_counter() - start:.0f} s: {url}/v1 (OpenAI-compatible), "
          f"{url}/metrics, {url}/health", flush=True)
    return url


def stop_app(config: AppConfig) -> None:
    import ray
    from ray import serve

    serve.delete(config.server.app_name)
    serve.shutdown()
    ray.shutdown()


def with_api_key(config: AppConfig, api_key: str | None) -> AppConfig:
    """The config with the command line's API key, if one was given."""
    if not api_key:
        return config
    data = config.model_dump()
    data["server"]["api_key"] = api_key
    data["transfer"]["auth_token"] = config.transfer.auth_token.get_secret_value()
    return AppConfig.model_validate(data)


def serve_forever(config_path: Path, api_key: str | None, address: str | None,
                  detach: bool) -> int:
    config = with_api_key(AppConfig.from_yaml(config_path), api_key)
    stop = threading.Event()

    def handle_signals() -> None:
        # before the app starts: a SIGTERM while replicas load still ends in an orderly
        # shutdown (Ray's own handler would abort this process mid-start)
        if not detach:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())

    try:
        start_app(config, address, handle_signals)
    except RuntimeError as err:
        print(f"[serve] the app failed to start: {err}\n(replica logs: /tmp/ray/session_latest/"
              "logs/serve/)", flush=True)
        stop_app(config)
        return 1
    if detach:
        print("[serve] detached: the app keeps running on the Ray cluster "
              f"(`serve delete {config.server.app_name}` stops it)")
        return 0
    print("[serve] Ctrl-C stops the app", flush=True)
    stop.wait()
    print("[serve] shutting down", flush=True)
    stop_app(config)
    return 0


def _step_line(step: dict[str, Any] | None) -> str:
    if step is None:
        return "decode step: unknown"
    source = "fitted" if step["fitted"] else "estimated until it is fitted"
    return (f"decode step {step['s0_ms']:.1f} + {step['s1_ms_per_seq']:.2f} ms per sequence "
            f"({source})")


def _model_line(model: dict[str, float]) -> str:
    return "prefill model " + ", ".join(
        f"{n // 1024}K {model[f'predicted_ms_{n}']:.0f} ms" if n >= 1024
        else f"{n} {model[f'predicted_ms_{n}']:.0f} ms" for n in (128, 1024, 4096, 8192))


def show_status(address: str, app_name: str) -> int:
    import ray
    from ray import serve

    ray.init(address=address, log_to_driver=False)
    status = serve.status()
    app = status.applications.get(app_name)
    if app is None:
        print(f"no application {app_name!r} on this Ray cluster "
              f"(found: {', '.join(status.applications) or 'none'})")
        return 1
    print(f"application {app_name}: {getattr(app.status, 'value', app.status)}")
    for name, deployment in app.deployments.items():
        replicas = ", ".join(f"{count} {state}" for state, count in
                             deployment.replica_states.items())
        state = getattr(deployment.status, "value", deployment.status)
        print(f"  {name:<14} {state:<10} replicas: {replicas or 'none'}")
    print("\n".join(format_pool_status(asyncio.run(_pool_status(app_name)))))
    return 0


async def _pool_status(app_name: str) -> dict[str, Any]:
    """The ingress's pool_status, called from an event loop: a Serve handle made with
    RAY_SERVE_THROUGHPUT_OPTIMIZED set (as `disagg serve` sets it in its own environment)
    runs its router on the caller's loop and cannot be used from plain synchronous code."""
    from ray import serve

    result: dict[str, Any] = await serve.get_app_handle(app_name).pool_status.remote()
    return result


def format_pool_status(status: dict[str, Any]) -> list[str]:
    """`disagg status`'s lines for the ingress's `pool_status` (the same dict as
    /v1/disagg/status): the scheduler's view, direct calls, and one replica per pool."""
    pools = dict(status)
    view = pools.pop("scheduler")
    direct = pools.pop("direct_calls", None)
    lines = ["scheduler (the ingress's view of every replica):"]
    for lane, lane_view in view["lanes"].items():
        lines.append(f"  {lane} lane: {lane_view['in_flight']} in flight")
    for p in view["prefill"]:
        left = p["remaining_ms"]
        lines.append(f"  prefill {p['replica']} [{p['lane']}]: {p['outstanding']} prompts in "
                     f"flight, work left {left['short']:.0f} ms short + {left['long']:.0f} ms "
                     f"long; {_model_line(p['model'])}; {_step_line(p.get('decode_step'))}; "
                     f"report {p['report_age_s']:.1f} s old")
    for d in view["decode"]:
        left = d["local_remaining_ms"]
        lines.append(f"  decode {d['replica']}: {d['free_blocks']}/{d['total_blocks']} blocks "
                     f"free, {d['active_seqs']} sequences, TPOT {d['tpot_ms']:.1f} ms, local "
                     f"prefill left {left['short'] + left['long']:.0f} ms; "
                     f"{_model_line(d['model'])}; {_step_line(d.get('decode_step'))}")
    for role, demand in view.get("demand", {}).items():
        lines.append(f"  {role} pool demand: {demand['replicas']:.2f} replicas "
                     f"({demand['reason']})")
    decisions = ", ".join(f"{k}: {v}" for k, v in sorted(view["decisions"].items()))
    lines.append(f"  decisions: {decisions or 'none yet'}; long prompts moved while waiting: "
                 f"{view.get('moved', 0)}")
    if (handoff := view.get("handoff")) is not None:
        lines.append(f"  split path beyond the prefill (measured, {handoff['samples']} requests): "
                     f"first token +{handoff['first_token_ms']:.1f} ms, transfer latency "
                     f"{handoff['transfer_latency_ms']:.1f} ms")
    if direct is not None:
        calls = ", ".join(f"{k}: {v}" for k, v in sorted(direct["calls"].items()))
        lines.append(f"  direct calls: {direct['connected']} of {len(direct['replicas'])} "
                     f"replicas connected; calls {calls or 'none yet'}; load reports read "
                     f"over them {direct.get('load_reads', 0)}")
    lines.append("one replica per pool (engine view):")
    for role in ("prefill", "decode"):  # entries added later are not pools
        if (replica := pools.get(role)) is None:
            continue
        load, kv = replica["load"] or {}, replica["kv"]
        lines.append(f"  {role} replica {replica['replica_id']}: kv cache "
                     f"{100 * load.get('kv_cache_usage', 0):.1f}% used, "
                     f"{load.get('num_running', 0)} running, {load.get('num_waiting', 0)} "
                     f"waiting, {kv['num_leases']} leases ({kv['num_leased_blocks']} blocks), "
                     f"{kv['num_loads_done']} loads done, {kv['num_loads_failed']} failed")
        usage = replica.get("usage") or {}
        if usage.get("wall_s"):
            busy, wall = usage["busy_s"], usage["wall_s"]
            lines.append(f"    engine busy {busy:.1f} s of {wall:.1f} s "
                         f"({100 * busy / wall:.0f}%; idle capacity {wall - busy:.1f} s), "
                         f"{busy - usage['attributed_s']:.1f} s busy charged to no request")
    return lines
