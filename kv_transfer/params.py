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

    def __post_init__(self) -> None:
        needed = -(-self.num_tokens // self.block_size)
        assert len(self.block_ids) == needed, (
            f"{len(self.block_ids)} blocks published for {self.num_tokens} tokens "
            f"at block size {self.block_size} (expected {needed})"
        )


@dataclass(frozen=True)
class TransferStats:
    """What the consumer's connector did for one request.

    transfer_ms is the pull's own duration; exposed_transfer_ms is how long the request waited
    for its KV: from the load reaching the consumer's worker to the blocks being in place
    (queueing for a pull thread included). Whatever part of the transfer ran before the load
    reached the worker (hidden behind compute) is in transfer_ms but not in exposed_transfer_ms.
    """

    num_loaded_tokens: int
    num_loaded_blocks: int
    transfer_bytes: int
    transfer_ms: float
    error: str = ""
    exposed_transfer_ms: float = 0.0


def producer_request_params() -> dict[str, Any]:
    """kv_transfer_params for a prefill request whose KV will be pulled by a decode worker."""
    return {PRODUCE_KEY: True}


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
