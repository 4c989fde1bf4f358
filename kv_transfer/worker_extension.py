"""Methods added to vLLM's worker (`worker_extension_cls`) so the engine wrappers can read
the connector's state through `collective_rpc`, vLLM's public RPC to its workers."""

from __future__ import annotations

from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

from kv_transfer.connector import DisaggConnector
from kv_transfer.connector_worker import WorkerStats
from kv_transfer.params import PrefetchSpec


class DisaggWorkerExtension:
    def disagg_kv_stats(self) -> WorkerStats | None:
        connector = _connector()
        return connector.worker_stats() if connector else None

    def disagg_load_error(self, request_id: str) -> str:
        connector = _connector()
        return connector.load_error(request_id) if connector else ""

    def disagg_prefetch(self, spec: PrefetchSpec) -> bool:
        """Consumer: start an overlapped pull into staging; False if skipped."""
        connector = _connector()
        return connector.prefetch(PrefetchSpec.from_wire(spec)) if connector else False

    def disagg_cancel_prefetch(self, stream_handle: str) -> None:
        connector = _connector()
        if connector:
            connector.cancel_prefetch(stream_handle)

    def disagg_kv_endpoint(self) -> str:
        """Producer: the endpoint consumers dial for this worker's blocks."""
        connector = _connector()
        return connector.endpoint if connector else ""


def _connector() -> DisaggConnector | None:
    if not has_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    assert isinstance(connector, DisaggConnector), type(connector).__name__
    return connector
