"""The Ray Serve app shared by the HTTP/gRPC API tests (one per test session).

It is started as `disagg serve` starts it (direct ingress: the ingress serves HTTP itself).
"""

from __future__ import annotations

import time

import httpx
import pytest

from runtime.engines import free_port

API_KEY = "test-key-" + "k" * 24
MODEL = "tiny"


@pytest.fixture(scope="session")
def serve_app(tiny_model):
    from runtime.app_config import AppConfig
    from runtime.serve_cli import start_app, stop_app

    port, grpc_port = free_port(), free_port()
    config = AppConfig.model_validate({
        "engine": {"model": str(tiny_model), "kv_cache_bytes": 256 << 20, "max_num_seqs": 16},
        "prefill": {"num_cpus": 0, "cost_per_replica_hour": 3.6},
        "decode": {"num_cpus": 0, "cost_per_replica_hour": 1.8},
        "transfer": {"lease_s": 6.0},
        # prompts over 256 tokens always split here (the tests below check the handoff);
        # shorter ones go wherever the scheduler predicts the first token sooner
        "scheduler": {"long_prompt_tokens": 1000, "local_max_prompt_tokens": 256,
                      "prefill_replicas_decode": False},
        "server": {"http_port": port, "grpc_port": grpc_port, "api_key": API_KEY,
                   "served_model_name": MODEL},
    })
    # as `disagg serve` starts it: direct ingress, the ingress serving HTTP on its port
    url = start_app(config, address=None)
    _wait_for_load_reports(url)
    yield ServeApp(url, f"127.0.0.1:{grpc_port}")
    stop_app(config)


def _wait_for_load_reports(url: str, timeout_s: float = 30.0) -> None:
    """The scheduler decides once both pools have reported their load (every 0.2 s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = httpx.get(f"{url}/v1/disagg/status", timeout=10,
                         headers={"Authorization": f"Bearer {API_KEY}"}).json()["scheduler"]
        if view["prefill"] and view["decode"]:
            return
        time.sleep(0.2)
    raise AssertionError("replicas never reported their load to the ingress")


class ServeApp(str):
    """The HTTP base URL (as a str), with the gRPC endpoint beside it."""

    def __new__(cls, http_url: str, grpc_endpoint: str) -> ServeApp:
        app = super().__new__(cls, http_url)
        app.grpc_endpoint = grpc_endpoint
        return app


