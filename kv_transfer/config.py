"""The transfer settings, defined once.

`TransferSettings` holds every setting of the KV transfer an operator chooses; it is the single
definition. Two models extend it:
  - `runtime.engine_config.TransferConfig`: the app YAML's `transfer:` section (adds what only
    the runtime uses: `gloo_test_mode`, `on_transfer_failure`, a generated token);
  - `ConnectorConfig` (here): what one engine's connector receives through vLLM's
    `KVTransferConfig.kv_connector_extra_config`; it adds what the engine builder resolves per
    engine (the collective backend) and requires the token.
`runtime.engines.connector_config` copies the shared fields across by name, so a field added to
`TransferSettings` reaches the connector and the YAML at once.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from kv_transfer.kinds import ChannelName, CollectiveBackend, DataChannel, TransportKind

MIN_TOKEN_CHARS = 16


class TransferSettings(BaseModel):
    """The KV transfer between prefill (producer) and decode (consumer) engines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transport: TransportKind = Field(
        "grpc", description="Block payload path: 'grpc' (gRPC streams or bulk TCP, see "
        "data_channel) or 'nccl' (torch.distributed send/recv between the two workers' "
        "devices on a pair group; control stays on gRPC)."
    )
    bind_host: str = Field("127.0.0.1", description="Address prefill KV servers bind to.")
    advertise_host: str = Field("", description="Address decode workers dial; empty: bind_host.")
    port: int = Field(
        0, ge=0, le=65535, description="Prefill KV server port; 0: a free port, chosen per "
        "engine (a fixed port allows one prefill engine per host)."
    )
    lease_s: float = Field(10.0, gt=0, description="Unreleased blocks are freed after this.")
    pull_timeout_s: float = Field(30.0, gt=0, description="Deadline for one request's pull.")
    max_chunk_bytes: int = Field(
        1 << 20, ge=4096, description="Upper bound on one streamed chunk's payload."
    )
    handle_wait_s: float = Field(
        2.0, ge=0, description="How long the producer waits for a just-published handle."
    )
    num_pull_threads: int = Field(4, ge=1, description="Concurrent pulls per decode worker.")
    data_channel: DataChannel = Field(
        "tcp",
        description="KV payload path: 'grpc' streams, or 'tcp': a bulk TCP data port on each "
        "prefill worker, opened per pull over gRPC (control and auth stay on gRPC).",
    )
    num_streams: int = Field(1, ge=1, le=16, description="Parallel streams per pull.")
    group_timeout_s: float = Field(
        10.0, gt=0, description="nccl transport: longest wait for one send/recv or rendezvous."
    )
    overlap: bool = Field(
        False, description="Move a prompt's KV while it is prefilled: the producer serves each "
        "layer of each block as soon as it is computed, the decode worker prefetches it into "
        "staging during the prefill (every transport: grpc/tcp and nccl/gloo). Off: the decode "
        "worker pulls after the prefill. Off by default until verified on engines."
    )
    max_prefetch_bytes: int = Field(
        1 << 30, ge=0, description="Decode worker: staging memory all prefetches may hold at "
        "once (one prefetch holds its prompt's KV); a prefetch over it is skipped."
    )


class ConnectorConfig(TransferSettings):
    """Settings of the disagg KV connector, one per engine."""

    auth_token: SecretStr = Field(
        ..., min_length=MIN_TOKEN_CHARS,
        description="Cluster shared token; every KV call must carry it.",
    )
    collective_backend: CollectiveBackend = Field(
        "nccl", description="Pair-group backend of the nccl transport: nccl (GPUs) or gloo "
        "(CPU test mode, the same code)."
    )

    @property
    def channel(self) -> ChannelName:
        """The data channel a consumer pulls over (channels/registry.py)."""
        return "nccl" if self.transport == "nccl" else self.data_channel

    @property
    def served_channels(self) -> tuple[ChannelName, ...]:
        """The data channels a producer serves: both gRPC-authorized ones always (a consumer of
        either may pull), the collective one with the nccl transport (it needs its backend)."""
        return ("grpc", "tcp", "nccl") if self.transport == "nccl" else ("grpc", "tcp")

    @property
    def endpoint(self) -> str:
        return f"{self.advertise_host or self.bind_host}:{self.port}"

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any]) -> ConnectorConfig:
        return cls.model_validate(extra)

    def to_extra_config(self) -> dict[str, Any]:
        fields = self.model_dump()
        fields["auth_token"] = self.auth_token.get_secret_value()
        return fields
