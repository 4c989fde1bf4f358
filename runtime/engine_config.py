"""Configuration of one vLLM engine and of the KV transfer between engines."""

from __future__ import annotations

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from kv_transfer.config import MIN_TOKEN_CHARS, TransferSettings
from kv_transfer.kinds import CollectiveBackend

Dtype = Literal["float32", "bfloat16", "float16"]
TransferFailurePolicy = Literal["fail", "recompute"]
SchedulingPolicy = Literal["priority", "fcfs"]
EngineRole = Literal["prefill", "decode", "colocated"]
Executor = Literal["uni", "mp"]


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
        None, description="CPU engines: cores for the engine's threads, e.g. '0', '0-1' or "
        "'0,2' (vLLM's VLLM_CPU_OMP_THREADS_BIND; also 'auto' or 'nobind')."
    )
    cpu_threads: int | None = Field(
        None, ge=1, description="CPU engines: threads of the engine's tensor ops "
        "(OMP_NUM_THREADS of its processes). None: one per core of cpu_threads_bind when it "
        "names cores; else the process's own setting: in a Ray replica that is Ray's default, "
        "the replica's num_cpus rounded down and at least 1, so a replica with num_cpus 0 or "
        "1 computes on one thread whatever the machine has.")
    executor: Executor = Field(
        "uni", description="'uni': the model runs in the engine core process (vLLM's default "
        "for one GPU). 'mp': in a worker process of its own, which vLLM's CPU platform "
        "otherwise chooses; the engine core then busy-waits for each step's result "
        "(sched_yield for 1 s after every read), so a busy engine takes a second core's time "
        "from the other engines and the front-ends.")

    @field_validator("cpu_threads_bind")
    @classmethod
    def _check_cores(cls, bind: str | None) -> str | None:
        if bind not in (None, *BIND_WORDS):
            core_set(bind)
        return bind


BIND_WORDS = ("auto", "nobind")  # vLLM's own values: it binds (or not) by itself


def core_set(bind: str) -> set[int]:
    """The cores of vLLM's VLLM_CPU_OMP_THREADS_BIND for one worker: "3", "0-3", "0,2-3" (a
    "|" starts the next worker's list)."""
    cores: set[int] = set()
    for part in bind.split("|")[0].split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"engine.cpu_threads_bind {bind!r}: expected cores as 3, 0-3 or "
                             "0,2-3")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


class TransferConfig(TransferSettings):
    """How KV blocks move from prefill engines to decode engines: the app YAML's `transfer:`
    section. Its transfer fields are `kv_transfer.config.TransferSettings` (defined once, passed
    to each engine's connector by `runtime.engines.connector_config`); the fields below are the
    runtime's own."""

    gloo_test_mode: bool = Field(
        False, description="transport 'nccl' only: run the very same code on the gloo backend "
        "(CPU), for tests and machines without CUDA. 'nccl' needs CUDA unless this is set."
    )
    auth_token: SecretStr = Field(
        default_factory=lambda: SecretStr(secrets.token_urlsafe(32)), min_length=MIN_TOKEN_CHARS,
        description="Shared token of the cluster; generated when not given.",
    )
    on_transfer_failure: TransferFailurePolicy = Field(
        "fail", description="fail the request, or recompute its prompt on the decode engine."
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
