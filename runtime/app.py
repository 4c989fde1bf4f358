"""Build the Ray Serve application: prefill pool, decode pool, ingress (global scheduler)."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from runtime.app_config import AppConfig, PoolConfig
from runtime.deployments import DecodeServer, PrefillServer
from runtime.ingress import Ingress
from runtime.routing import PinnedReplicaRouter

# Serve replaces a replica after a few failed checks; with a dead or stuck engine that should
# take seconds, not the half minute of Serve's default 10 s period. (The ingress stops
# choosing the replica sooner still: its reports say the engine is unhealthy.)
HEALTH_CHECK_PERIOD_S = 2.0


def _actor_options(pool: PoolConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
    if pool.resources:
        options["resources"] = dict(pool.resources)
    return options


def build_app(config: AppConfig) -> serve.Application:
    pinned = RequestRouterConfig(request_router_class=PinnedReplicaRouter)  # type: ignore[arg-type]
    prefill = None  # colocated serving has no prefill pool
    if config.serving == "disaggregated":
        prefill = PrefillServer.options(  # type: ignore[attr-defined]
            name="PrefillServer",
            request_router_config=pinned,
            num_replicas=config.prefill.replicas,
            ray_actor_options=_actor_options(config.prefill),
            max_ongoing_requests=config.prefill.max_ongoing_requests,
            health_check_period_s=HEALTH_CHECK_PERIOD_S,
        ).bind(config)
    decode = DecodeServer.options(  # type: ignore[attr-defined]
        name="DecodeServer",
        request_router_config=pinned,
        num_replicas=config.decode.replicas,
        ray_actor_options=_actor_options(config.decode),
        max_ongoing_requests=config.decode.max_ongoing_requests,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
    ).bind(config)
    return Ingress.options(  # type: ignore[attr-defined]
        name="Ingress", ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.server.max_concurrent_requests
    ).bind(config, prefill, decode)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for `serve run` / `serve deploy` configs: args {"config": "path.yaml"}."""
    if "config" not in args:
        raise ValueError("app_builder needs args: {config: <path of a disagg YAML config>}")
    return build_app(AppConfig.from_yaml(args["config"]))
