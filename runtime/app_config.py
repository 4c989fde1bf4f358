"""The deployment's one configuration file (YAML), validated at load.

    engine:                      # shared by both pools unless a pool overrides a field
      model: /models/llama
      block_size: 128
    prefill: {replicas: 1, num_cpus: 1, engine: {max_num_batched_tokens: 8192}}
    decode:  {replicas: 2, num_cpus: 1, resources: {decode_node: 1}, cost_per_replica_hour: 2.5}
    transfer: {data_channel: tcp, on_transfer_failure: recompute}
    scheduler: {long_prompt_tokens: 4096}
    server: {http_port: 8000, grpc_port: 9000, api_key: null}
    slo: {ttft_ms: 2000, tpot_ms: 100}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from runtime.autoscaling import AutoscalingSpec
from runtime.engine_config import EngineConfig, TransferConfig


class PoolConfig(BaseModel):
    """One worker pool: a Ray Serve deployment with its own replicas and resources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replicas: int = Field(1, ge=1, description="Number of replicas (one vLLM engine each).")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved per replica.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources, to pin the pool to node types."
    )
    engine: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the shared engine settings."
    )
    max_ongoing_requests: int = Field(256, ge=1, description="Requests in flight per replica.")
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Let the pool size itself between min and max replicas on the "
        "scheduler's signals (runtime/autoscaling.py); None: `replicas`, fixed.")
    cost_per_replica_hour: float = Field(
        0.0, ge=0, description="What one replica of this pool costs per hour (any currency): "
        "each request's engine-seconds on the pool are priced at it (timings.cost.dollars, "
        "usage.cost). 0: costs are reported in seconds only.")
    cpu_cores: list[str] = Field(
        default_factory=list,
        description="CPU engines: cores per replica (replica of local rank i takes entry "
        "i mod len), e.g. ['0', '1']; overrides engine.cpu_threads_bind. Empty: no pinning "
        "beyond the engine setting.",
    )

    def cores_for(self, local_rank: int) -> str | None:
        return self.cpu_cores[local_rank % len(self.cpu_cores)] if self.cpu_cores else None


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    long_prompt_tokens: int = Field(
        4096, ge=1, description="Prompts at least this long are in the long lane."
    )
    long_prefill_ms: float | None = Field(
        None, gt=0, description="Also in the long lane: prompts whose predicted prefill (on a "
        "typical prefill replica, from its fitted model) takes at least this long; None: by "
        "length only.")
    long_lane_replicas: int = Field(
        0, ge=0, description="Prefill replicas reserved for the long lane (0: lanes share all)."
    )
    local_max_prompt_tokens: int | None = Field(
        None, ge=0, description="Longest prompt a decode replica may prefill itself (local "
        "mode); None: any, when the policy predicts it is faster and within the TPOT budget."
    )
    prefill_replicas_decode: bool = Field(
        True, description="A prefill replica may decode a prompt it prefills, when that adds "
        "less time in all than handing its KV cache to a decode replica (`prefill_local`). "
        "False: it decodes only when no decode replica has room or is live (pools on "
        "hardware meant for one phase).")
    max_queued_per_replica: int = Field(
        256, ge=0, description="Requests a decode replica may hold beyond its engine's "
        "max_num_seqs; when every replica is that full, requests get 429 + Retry-After.")
    calibrate: bool = Field(
        True, description="Each replica measures its engine's prefill time at a few prompt "
        "lengths when it starts (a few seconds), to seed the scheduler's prefill model."
    )
    admission: bool = Field(
        False, description="Reject (429) requests whose predicted TTFT exceeds slo.ttft_ms."
    )
    stale_after_s: float = Field(
        1.0, gt=0, description="A replica whose last load report (every 0.4 s) is older is "
        "taken for dead: no new request goes to it.")
    link_bytes_per_s: float = Field(2e9, gt=0, description="KV transfer speed, for estimates.")


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address the HTTP and gRPC servers bind to.")
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(9000, ge=0, le=65535, description="0 disables the gRPC API.")
    api_key: SecretStr | None = Field(None, description="Required bearer token, if set.")
    served_model_name: str = Field("", description="Model name clients use; default: the path.")
    app_name: str = Field("disagg", description="Ray Serve application name.")
    max_concurrent_requests: int = Field(
        1024, ge=1, description="Requests the ingress runs at once per API (gRPC: "
        "RESOURCE_EXHAUSTED beyond it; HTTP: Serve's max_ongoing_requests of the ingress).")
    max_body_bytes: int = Field(
        16 << 20, ge=1024, description="Largest HTTP request body accepted (413 beyond).")
    request_timeout_s: float = Field(
        600.0, gt=0, description="A request still running after this long ends with a clear "
        "error (HTTP 504, gRPC DEADLINE_EXCEEDED) and frees all it held.")
    token_stream: bool = Field(
        True, description="Decode replicas send generated tokens to the ingress over one TCP "
        "connection each (on transfer.bind_host), all requests of an engine step in one "
        "frame; off: over each request's Serve call, batched by stream_interval_ms.")
    stream_interval_ms: float = Field(
        50.0, ge=0, le=1000, description="Without the token stream: decode replicas send the "
        "tokens of this long as one message to the ingress (the first and the last at once); "
        "0 sends every engine step on its own.")
    direct_calls: bool = Field(
        True, description="The ingress calls pool replicas' request methods (prefill, "
        "decode) over one TCP connection per replica (on transfer.bind_host, "
        "token-authenticated) instead of a Serve handle call each (about 8 ms on two "
        "cores); a replica without a connection up is called through Serve. Off: always "
        "Serve.")
    direct_ingress: bool = Field(
        True, description="The ingress replica serves HTTP on http_port itself (Ray Serve's "
        "direct ingress, throughput-optimized mode), so streamed chunks skip Serve's proxy. "
        "Off: Serve's HTTP proxy listens on http_port and forwards to the ingress.")


class SLOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_ms: float | None = Field(None, gt=0, description="Target time to first token.")
    tpot_ms: float | None = Field(None, gt=0, description="Target time per output token.")


Serving = Literal["disaggregated", "colocated"]


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    serving: Serving = Field(
        "disaggregated",
        description="'disaggregated': prefill and decode pools with KV handoff, and the global "
        "scheduler choosing per request; 'colocated': disaggregation off, only the decode "
        "pool, each engine prefills and decodes its requests (chunked prefill), least-loaded "
        "routing (the baseline disaggregation is measured against).",
    )
    engine: EngineConfig
    prefill: PoolConfig = Field(default_factory=PoolConfig)
    decode: PoolConfig = Field(default_factory=PoolConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    slo: SLOConfig = Field(default_factory=SLOConfig)

    @property
    def prefill_engine(self) -> EngineConfig:
        return self.engine.model_copy(update=self.prefill.engine)

    @property
    def decode_engine(self) -> EngineConfig:
        return self.engine.model_copy(update=self.decode.engine)

    @property
    def model_name(self) -> str:
        return self.server.served_model_name or self.engine.model

    @model_validator(mode="after")
    def _admission_needs_an_slo(self) -> AppConfig:
        if self.scheduler.admission and self.slo.ttft_ms is None:
            raise ValueError("scheduler.admission needs slo.ttft_ms (the TTFT to admit against)")
        return self

    @model_validator(mode="after")
    def _pools_agree(self) -> AppConfig:
        for pool in (self.prefill, self.decode):
            EngineConfig.model_validate({**self.engine.model_dump(), **pool.engine})
        prefill, decode = self.prefill_engine, self.decode_engine
        for field in ("model", "dtype", "block_size"):
            p, d = getattr(prefill, field), getattr(decode, field)
            if p != d:
                raise ValueError(
                    f"prefill and decode pools must use the same {field} (the KV blocks move "
                    f"between them as they are): prefill has {p!r}, decode has {d!r}"
                )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> AppConfig:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        engine = data.get("engine")
        if isinstance(engine, dict) and isinstance(engine.get("model"), str):
            engine["model"] = str(Path(engine["model"]).expanduser())
        return cls.model_validate(data)
