"""The disagg KV connector, loaded by vLLM through its public connector interface.

    KVTransferConfig(
        kv_connector="DisaggConnector",
        kv_connector_module_path="kv_transfer.connector",
        kv_role="kv_producer" | "kv_consumer",
        kv_connector_extra_config=ConnectorConfig(...).to_extra_config(),
    )

vLLM builds one instance per role: the SCHEDULER one in the engine core (connector_scheduler.py)
and a WORKER one in each worker process (connector_worker.py). This class only routes vLLM's
calls to the side that owns them. The block exchange follows vLLM's NIXL pull protocol with NIXL
replaced by our transfer (a gRPC control plane, control*.py, and a data channel chosen by config,
channels/): the producer keeps a finished prompt's blocks under a lease, the consumer pulls them
by block id and releases them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
)

from kv_transfer.config import ConnectorConfig
from kv_transfer.connector_scheduler import ConnectorScheduler
from kv_transfer.connector_worker import ConnectorWorker, WorkerStats
from kv_transfer.metadata import DisaggConnectorMetadata
from kv_transfer.params import PrefetchSpec

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class DisaggConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer_config = self._kv_transfer_config
        config = ConnectorConfig.from_extra_config(transfer_config.kv_connector_extra_config)
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("DisaggConnector supports tensor_parallel_size=1 only")
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise ValueError("DisaggConnector supports models with one KV cache group only")
        if transfer_config.is_kv_producer and config.port == 0:
            raise ValueError("DisaggConnector producer needs a fixed port in its extra config")
        self._scheduler: ConnectorScheduler | None = None
        self._worker: ConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = ConnectorScheduler(config, vllm_config.cache_config.block_size)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            model_config = vllm_config.model_config
            self._worker = ConnectorWorker(
                config,
                is_producer=transfer_config.is_kv_producer,
                is_consumer=transfer_config.is_kv_consumer,
                num_blocks=kv_cache_config.num_blocks,
                tp_size=vllm_config.parallel_config.tensor_parallel_size,
                tp_rank=get_tensor_model_parallel_rank(),
                block_size=vllm_config.cache_config.block_size,
                num_kv_heads=model_config.get_num_kv_heads(vllm_config.parallel_config),
                head_dim=model_config.get_head_size(),
            )
        self._endpoint = config.endpoint

    @property
    def scheduler_side(self) -> ConnectorScheduler:
        assert self._scheduler is not None, "scheduler-side call on a worker connector"
        return self._scheduler

    @property
    def worker_side(self) -> ConnectorWorker:
        assert self._worker is not None, "worker-side call on a scheduler connector"
        return self._worker

    # Worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker_side.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, DisaggConnectorMetadata)
        self.worker_side.start_load_kv(meta)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None:
            assert isinstance(connector_metadata, DisaggConnectorMetadata)
            self._worker.begin_step(connector_metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads complete before the request is scheduled (async, whole request): a load that
        # waited here would stall the whole batch's forward pass, and the only thing it could
        # overlap with is the decode engine's one-token step.
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        # The producer serves blocks from the paged cache itself; this layer of the step's
        # tokens is written now, so stream pulls may send it while later layers compute.
        self.worker_side.layer_saved(layer_name)

    def wait_for_save(self) -> None:
        self.worker_side.step_saved()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        return self.worker_side.get_transfer_results(finished_req_ids)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending, results.finished_recving

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self.worker_side.build_worker_meta()

    def worker_stats(self) -> WorkerStats:
        return self.worker_side.stats()

    def load_error(self, request_id: str) -> str:
        return self.worker_side.load_error(request_id)

    def prefetch(self, spec: PrefetchSpec) -> bool:
        return self.worker_side.prefetch(spec)

    def cancel_prefetch(self, stream_handle: str) -> None:
        self.worker_side.cancel_prefetch(stream_handle)

    @property
    def endpoint(self) -> str:
        """The producer's KV server endpoint (as consumers dial it)."""
        return self._endpoint

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # Scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler_side.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler_side.update_connector_output(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler_side.request_finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        return self._scheduler is not None and self._scheduler.has_pending_work()
