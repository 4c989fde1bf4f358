"""Messages between the connector's scheduler side and its worker side (in-process dataclasses).

vLLM carries them from the scheduler to the worker process inside its scheduler output and
back inside the model runner output; they must stay picklable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from kv_transfer.params import TransferStats


@dataclass(frozen=True)
class LoadSpec:
    """Consumer: pull these remote blocks into these local blocks."""

    request_id: str
    endpoint: str
    handle: str
    remote_block_ids: tuple[int, ...]
    local_block_ids: tuple[int, ...]
    num_tokens: int
    stream_handle: str = ""  # take the blocks from this prefetch when it has them
    first_block_index: int = 0  # index of remote_block_ids[0] among the prompt's blocks


@dataclass(frozen=True)
class LeaseSpec:
    """Producer: hold these blocks for a consumer under this handle."""

    request_id: str
    handle: str
    block_ids: tuple[int, ...]
    lease_s: float


@dataclass(frozen=True)
class ReleaseSpec:
    """Consumer: the producer may free this handle without a pull (nothing to load)."""

    endpoint: str
    handle: str


@dataclass(frozen=True)
class StreamStep:
    """Producer: this step computes prompt tokens [num_ready_tokens, num_target_tokens) of a
    streamed request whose blocks (so far) are block_ids."""

    handle: str
    request_id: str
    num_prompt_tokens: int
    block_ids: tuple[int, ...]
    num_ready_tokens: int
    num_target_tokens: int


@dataclass(frozen=True)
class StreamEnd:
    """Producer: this stream's request will not hand its blocks off; stop its readers."""

    handle: str
    reason: str


@dataclass
class DisaggConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    leases: list[LeaseSpec] = field(default_factory=list)
    releases: list[ReleaseSpec] = field(default_factory=list)
    stream_steps: list[StreamStep] = field(default_factory=list)
    stream_ends: list[StreamEnd] = field(default_factory=list)


@dataclass
class DisaggWorkerMetadata(KVConnectorWorkerMetadata):
    """Per-request results of loads that completed in this step."""

    stats: dict[str, TransferStats] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, DisaggWorkerMetadata), f"cannot merge {type(other).__name__}"
        return DisaggWorkerMetadata({**self.stats, **other.stats})
