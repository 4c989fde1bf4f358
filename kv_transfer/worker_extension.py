"""Methods added to vLLM's worker (`worker_extension_cls`) so the engine wrappers can read
the connector's state through `collective_rpc`, vLLM's public RPC to its workers."""

from __future__ import annotations

from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

from kv_transfer.connector import DisaggConnector
from kv_transfer.connector_worker import WorkerStats


class DisaggWorkerExtension:
    def disagg_kv_stats(self) -> WorkerStats | None:
        connector = _connector()
        return connector.worker_stats() if connector else None

    def disagg_load_error(self, request_id: str) -> str:
        connector = _connector()
        return connector.load_error(request_id) if connector else ""


def _connector() -> DisaggConnector | None:
    if not has_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    assert isinstance(connector, DisaggConnector), type(connector).__name__
    return connector
