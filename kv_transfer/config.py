"""Connector configuration, parsed from `KVTransferConfig.kv_connector_extra_config`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from kv_transfer.kinds import CollectiveBackend, DataChannel, TransportKind


class ConnectorConfig(BaseModel):
    """Settings of the disagg KV connector, one per engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bind_host: str = Field("127.0.0.1", description="Address the producer's KV server binds to.")
    advertise_host: str = Field(
        "", description="Address consumers dial; empty means bind_host."
    )
    port: int = Field(0, ge=0, le=65535, description="Producer KV server port (producer only).")
    auth_token: SecretStr = Field(
        ..., min_length=16, description="Cluster shared token; every KV call must carry it."
    )
    lease_s: float = Field(10.0, gt=0, description="Producer frees unreleased blocks after this.")
    max_chunk_bytes: int = Field(
        1 << 20, ge=4096, description="Upper bound on one streamed chunk's payload."
    )
    pull_timeout_s: float = Field(
        30.0, gt=0, description="Deadline for pulling one request's blocks."
    )
    handle_wait_s: float = Field(
        2.0, ge=0, description="How long the producer waits for a just-published handle."
    )
    num_pull_threads: int = Field(4, ge=1, description="Concurrent pulls per consumer worker.")
    data_channel: DataChannel = Field(
        "tcp",
        description="Consumer: payload over gRPC streams, or over the producer's bulk TCP "
        "data port (authorized over gRPC; several times faster).",
    )
    num_streams: int = Field(1, ge=1, le=16, description="Parallel streams per pull.")
    transport: TransportKind = Field(
        "grpc", description="grpc: payload over gRPC or bulk TCP (data_channel); nccl: payload "
        "over a torch.distributed pair group, control over gRPC."
    )
    collective_backend: CollectiveBackend = Field(
        "nccl", description="Pair-group backend of the nccl transport: nccl (GPUs) or gloo "
        "(CPU test mode, the same code)."
    )
    group_timeout_s: float = Field(
        10.0, gt=0, description="nccl transport: longest wait for one send/recv or rendezvous."
    )
    overlap: bool = Field(
        False, description="Producer: serve a prompt's blocks layer by layer while prefilling it "
        "(stream pulls); consumer: accept prefetches that pull them into staging meanwhile."
    )
    max_prefetch_bytes: int = Field(
        1 << 30, ge=0, description="Consumer: staging memory all prefetches may hold at once; "
        "a prefetch that does not fit is skipped (the request then pulls after its prefill)."
    )

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
