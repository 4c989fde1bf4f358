"""Configuration of one vLLM engine and of the KV transfer between engines."""

from __future__ import annotations

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from kv_transfer.kinds import CollectiveBackend, DataChannel, TransportKind

Dtype = Literal["float32", "bfloat16", "float16"]
TransferFailurePolicy = Literal["fail", "recompute"]
SchedulingPolicy = Literal["priority", "fcfs"]
EngineRole = Literal["prefill", "decode", "colocated"]


class EngineConfig(BaseModel):
    """One vLLM engine; prefill and decode engines of a deployment must agree on model,
    dtype and block size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(..., description="Path of a Hugging Face checkpoint (never downloaded).")
    dtype: Dtype = Field("float32", description="Weights and KV cache dtype.")
    block_size: int = Field(128, ge=1, description="Tokens per KV cache block.")
    max_model_len: int = Field(16384, ge=16, description="Longest prompt + output in tokens.")
    kv_cache_bytes: int = Field(1 << 30, ge=1 << 20, description="KV cache memory per engine.")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences in one batch.")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Token budget per step (chunked prefill); None: vLLM's default."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse identical prompt prefixes.")
    scheduling_policy: SchedulingPolicy = Field(
        "priority", description="vLLM's scheduling policy. 'priority': the scheduler's lane is "
        "the request's priority, so short prompts are scheduled before long ones waiting in "
        "the same engine; 'fcfs': arrival order.")
    long_prefill_chunk_tokens: int = Field(
        512, ge=0, description="While other requests are in the engine, a prefill gets at most "
        "this many tokens of each step (vLLM's long_prefill_token_threshold), so a short "
        "prompt or a decode step never waits for a whole long prefill; 0: no cap.")
    enforce_eager: bool = Field(True, description="No graph capture or compilation.")
    cpu_threads_bind: str | None = Field(
        None, description="CPU engines: cores for the engine's threads, e.g. '0' or '0-1'."
    )


class TransferConfig(BaseModel):
    """How KV blocks move from prefill engines to decode engines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transport: TransportKind = Field(
        "grpc", description="Block payload path: 'grpc' (gRPC streams or bulk TCP, see "
        "data_channel) or 'nccl' (torch.distributed send/recv between the two workers' "
        "devices; control stays on gRPC). 'nccl' needs CUDA unless gloo_test_mode is set."
    )
    gloo_test_mode: bool = Field(
        False, description="transport 'nccl' only: run the very same code on the gloo backend "
        "(CPU), for tests and machines without CUDA."
    )
    bind_host: str = Field("127.0.0.1", description="Address prefill KV servers bind to.")
    advertise_host: str = Field("", description="Address decode workers dial; empty: bind_host.")
    auth_token: SecretStr = Field(
        default_factory=lambda: SecretStr(secrets.token_urlsafe(32)),
        description="Shared token of the cluster; generated when not given.",
    )
    lease_s: float = Field(10.0, gt=0, description="Unreleased blocks are freed after this.")
    pull_timeout_s: float = Field(30.0, gt=0, description="Deadline for one request's pull.")
    max_chunk_bytes: int = Field(1 << 20, ge=4096, description="Largest streamed chunk.")
    data_channel: DataChannel = Field(
        "tcp",
        description="KV payload path: 'grpc' streams, or 'tcp': a bulk TCP data port on each "
        "prefill worker, opened per pull over gRPC (control and auth stay on gRPC).",
    )
    num_streams: int = Field(1, ge=1, le=16, description="Parallel streams per pull.")
    on_transfer_failure: TransferFailurePolicy = Field(
        "fail", description="fail the request, or recompute its prompt on the decode engine."
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

    @model_validator(mode="after")
    def _check_transport(self) -> TransferConfig:
        if self.transport != "nccl":
            if self.gloo_test_mode:
                raise ValueError("gloo_test_mode applies to transport 'nccl' only")
            return self
        if not self.gloo_test_mode and not _has_cuda():
            raise ValueError(
                "transport 'nccl' needs CUDA GPUs and this machine has none; use transport "
                "'grpc', or set gloo_test_mode: true to run the nccl code path on gloo (CPU)"
            )
        return self

    @property
    def collective_backend(self) -> CollectiveBackend:
        return "gloo" if self.gloo_test_mode else "nccl"


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())
