"""Build the Ray Serve application: prefill pool, decode pool, ingress (global scheduler)."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import LoggingConfig

from runtime.app_config import AppConfig, PoolConfig
from runtime.deployments import DecodeServer, PrefillServer
from runtime.ingress import Ingress
from runtime.routing import PinnedReplicaRouter

# Serve replaces a replica after a few failed checks; with a dead or stuck engine that should
# take seconds, not the half minute of Serve's default 10 s period. (The ingress stops
# choosing the replica sooner still: its reports say the engine is unhealthy.)
HEALTH_CHECK_PERIOD_S = 2.0
# No access log line per call: replicas report their load several times a second, and a
# log line per streamed request is CPU the engines need (errors are still logged).
QUIET = LoggingConfig(enable_access_log=False)


def _actor_options(pool: PoolConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
    if pool.resources:
        options["resources"] = dict(pool.resources)
    return options


def _scaling(pool: PoolConfig, drain_s: float) -> dict[str, Any]:
    """A pool's replica count: fixed, or Serve's autoscaler on the scheduler's demand
    (runtime/autoscaling.py). A replica Serve removes finishes its requests first."""
    options: dict[str, Any] = {"graceful_shutdown_timeout_s": drain_s}
    spec = pool.autoscaling
    if spec is None:
        return {**options, "num_replicas": pool.replicas}
    return {**options, "autoscaling_config": {
        "min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
        "initial_replicas": min(spec.max_replicas, max(spec.min_replicas, pool.replicas)),
        "metrics_interval_s": 1.0, "look_back_period_s": 2.0,
        # Serve applies these delays again to what a custom policy returns (its defaults: 30
        # and 600 s); the policy holds its own (the pool's upscale/downscale_delay_s) and says
        # a new count only once it stands, so Serve must apply it at once
        "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
        "policy": {"policy_function": "runtime.autoscaling:PoolAutoscaler",
                   "policy_kwargs": {"upscale_delay_s": spec.upscale_delay_s,
                                     "downscale_delay_s": spec.downscale_delay_s,
                                     "min_replicas": spec.min_replicas,
                                     "max_replicas": spec.max_replicas}},
    }}


def build_app(config: AppConfig) -> serve.Application:
    pinned = RequestRouterConfig(request_router_class=PinnedReplicaRouter)  # type: ignore[arg-type]
    prefill = None  # colocated serving has no prefill pool
    if config.serving == "disaggregated":
        prefill = PrefillServer.options(  # type: ignore[attr-defined]
            name="PrefillServer",
            request_router_config=pinned,
            **_scaling(config.prefill, config.server.request_timeout_s),
            ray_actor_options=_actor_options(config.prefill),
            max_ongoing_requests=config.prefill.max_ongoing_requests,
            health_check_period_s=HEALTH_CHECK_PERIOD_S,
            logging_config=QUIET,
        ).bind(config)
    decode = DecodeServer.options(  # type: ignore[attr-defined]
        name="DecodeServer",
        request_router_config=pinned,
        **_scaling(config.decode, config.server.request_timeout_s),
        ray_actor_options=_actor_options(config.decode),
        max_ongoing_requests=config.decode.max_ongoing_requests,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        logging_config=QUIET,
    ).bind(config)
    return Ingress.options(  # type: ignore[attr-defined]
        name="Ingress", ray_actor_options={"num_cpus": 0}, logging_config=QUIET,
        max_ongoing_requests=config.server.max_concurrent_requests
    ).bind(config, prefill, decode)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for `serve run` / `serve deploy` configs: args {"config": "path.yaml"}."""
    if "config" not in args:
        raise ValueError("app_builder needs args: {config: <path of a disagg YAML config>}")
    return build_app(AppConfig.from_yaml(args["config"]))
