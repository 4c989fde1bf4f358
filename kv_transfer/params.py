"""What travels in vLLM's `kv_transfer_params`, as typed values.

vLLM carries connector parameters as a plain dict in `SamplingParams.extra_args` and returns them
on `RequestOutput.kv_transfer_params`. This module is the one place where that dict is written
and read; everything else handles the frozen dataclasses below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

PRODUCE_KEY = "do_remote_decode"
CONSUME_KEY = "do_remote_prefill"
TRANSFER_KEY = "disagg_transfer"
STATS_KEY = "disagg_transfer_stats"
STREAM_KEY = "disagg_stream_handle"


@dataclass(frozen=True)
class TransferParams:
    """Where a prefilled prompt's KV blocks wait and how to claim them.

    Published by the producer when the prompt is done; handed to the consumer unchanged.
    """

    endpoint: str
    handle: str
    block_ids: tuple[int, ...]
    num_tokens: int
    block_size: int
    lease_s: float
    stream_handle: str = ""  # the overlapped pull's handle, when the prefill streamed its KV

    def __post_init__(self) -> None:
        needed = -(-self.num_tokens // self.block_size)
        assert len(self.block_ids) == needed, (
            f"{len(self.block_ids)} blocks published for {self.num_tokens} tokens "
            f"at block size {self.block_size} (expected {needed})"
        )


@dataclass(frozen=True)
class TransferStats:
    """What the consumer's connector did for one request.

    transfer_ms is how long the payload was moving: the pull's duration, less the time a
    stream pull's producer waited for the prefill to compute blocks, plus the copy from the
    prefetch's staging into the paged cache. exposed_transfer_ms is how long the request
    waited for its KV: from the load reaching the consumer's worker to the blocks being in
    place (queueing for a pull thread included). Whatever part of the transfer ran before the
    load reached the worker (hidden behind the prefill's compute) is in transfer_ms but not in
    exposed_transfer_ms. overlapped: the blocks came from a prefetch that ran during the prefill.
    """

    num_loaded_tokens: int
    num_loaded_blocks: int
    transfer_bytes: int
    transfer_ms: float
    error: str = ""
    exposed_transfer_ms: float = 0.0
    overlapped: bool = False


@dataclass(frozen=True)
class PrefetchSpec:
    """Consumer: start pulling a prompt's KV while the producer is still prefilling it.

    The pipeline mints stream_handle (unguessable) and gives it to both sides: the producer's
    request carries it (producer_request_params), the consumer pulls the stream by it.
    """

    endpoint: str
    stream_handle: str
    num_tokens: int
    block_size: int

    @property
    def num_blocks(self) -> int:
        return -(-self.num_tokens // self.block_size)

    @classmethod
    def from_wire(cls, value: PrefetchSpec | dict[str, Any]) -> PrefetchSpec:
        """vLLM's RPC may deliver the dataclass as a dict of its fields."""
        return value if isinstance(value, PrefetchSpec) else cls(**value)


def producer_request_params(stream_handle: str = "") -> dict[str, Any]:
    """kv_transfer_params for a prefill request whose KV will be pulled by a decode worker;
    with stream_handle, its blocks are also served layer by layer while it is prefilled."""
    params: dict[str, Any] = {PRODUCE_KEY: True}
    if stream_handle:
        params[STREAM_KEY] = stream_handle
    return params


def stream_handle_of(params: dict[str, Any] | None) -> str:
    """The stream handle of a producer request ('' when it does not stream)."""
    return str(params.get(STREAM_KEY, "")) if params else ""


def consumer_request_params(transfer: TransferParams) -> dict[str, Any]:
    """kv_transfer_params for a decode request that loads its prompt's KV from a producer."""
    fields = asdict(transfer)
    fields["block_ids"] = list(transfer.block_ids)
    return {CONSUME_KEY: True, TRANSFER_KEY: fields}


def is_producer_request(params: dict[str, Any] | None) -> bool:
    return bool(params and params.get(PRODUCE_KEY))


def is_consumer_request(params: dict[str, Any] | None) -> bool:
    return bool(params and params.get(CONSUME_KEY) and TRANSFER_KEY in params)


def parse_transfer(params: dict[str, Any] | None) -> TransferParams | None:
    """The TransferParams inside a producer's output or a consumer's request, if any."""
    if not params or TRANSFER_KEY not in params:
        return None
    fields = dict(params[TRANSFER_KEY])
    fields["block_ids"] = tuple(int(block_id) for block_id in fields["block_ids"])
    return TransferParams(**fields)


def transfer_output_params(transfer: TransferParams) -> dict[str, Any]:
    """kv_transfer_params the producer returns on its finished request."""
    return {TRANSFER_KEY: consumer_request_params(transfer)[TRANSFER_KEY]}


def stats_output_params(stats: TransferStats) -> dict[str, Any]:
    """kv_transfer_params the consumer returns on its finished request."""
    return {STATS_KEY: asdict(stats)}


def parse_stats(params: dict[str, Any] | None) -> TransferStats | None:
    if not params or STATS_KEY not in params:
        return None
    return TransferStats(**params[STATS_KEY])
