"""Producer side of the connector's worker (a prefill engine's worker process, next to its KV
tensors).

Lifecycle:
  1. Built once the KV tensors are registered: starts the control server with every data
     channel this producer serves, and a reaper thread that expires overdue leases on time,
     busy or idle.
  2. Each step: `begin_step` (before the forward pass) applies the step's StreamSteps and
     StreamEnds (overlap); `grant` holds the blocks of the prompts the scheduler published;
     `layer_saved` (save_kv_layer, after each attention layer) and `step_saved`
     (wait_for_save) mark layers ready, so stream pulls send layer i while layer i+1 computes.
  3. `take_freed` reports the requests whose leases ended (released, expired) as finished
     sending; blocks still read by a stream reader are reported once it lets go.
  4. `shutdown` stops the reaper (joined) and the server, revoking every lease.
"""

from __future__ import annotations

import threading
import time

from vllm.logger import init_logger

from kv_transfer.channels.base import ChannelOptions, WorkerIdentity
from kv_transfer.config import ConnectorConfig
from kv_transfer.control_server import ControlServer
from kv_transfer.layout import KVLayout
from kv_transfer.leases import LeaseTable
from kv_transfer.metadata import DisaggConnectorMetadata, LeaseSpec
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.streams import StreamTable

logger = init_logger(__name__)

MAX_REAP_INTERVAL_S = 1.0


class ProducerWorker:
    """Serves one worker's finished (and, with overlap, still computing) prompts' blocks."""

    def __init__(self, config: ConnectorConfig, cache: PagedKVCache, layout: KVLayout,
                 identity: WorkerIdentity, block_size: int) -> None:
        self.leases = LeaseTable()
        self._streams: StreamTable | None = None
        if config.overlap:
            self._streams = StreamTable(cache.block_bytes_per_layer, block_size)
        self._layer_index = {name: i for i, name in enumerate(cache.layer_names)}
        self._freeing: set[str] = set()  # leases ended, blocks still read by a stream reader
        self._server = ControlServer(
            cache,
            self.leases,
            bind_host=config.bind_host,
            port=config.port,
            auth_token=config.auth_token.get_secret_value(),
            max_chunk_bytes=config.max_chunk_bytes,
            handle_wait_s=config.handle_wait_s,
            channels=config.served_channels,
            options=ChannelOptions(identity, config.group_timeout_s),
            streams=self._streams,
            stream_wait_s=config.pull_timeout_s,
            layout=layout,
        )
        self.endpoint = self._server.start()  # as bound (the config may name port 0)
        self._stopped = threading.Event()
        self._reaper = threading.Thread(target=self._reap_leases, name="kv-lease-reaper",
                                        daemon=True)
        self._reaper.start()
        logger.info("disagg KV server on %s (%s; %d layers, %d B per block)", self.endpoint,
                    "/".join(config.served_channels), cache.num_layers, cache.block_bytes)

    def begin_step(self, meta: DisaggConnectorMetadata) -> None:
        """Before the step's forward pass: what the step computes of each stream."""
        if self._streams is None:
            for end in meta.stream_ends:
                logger.debug("stream %s ended: %s (overlap off)", end.handle[:6], end.reason)
            return
        for end in meta.stream_ends:
            self._streams.fail(end.handle, end.reason)
        for step in meta.stream_steps:
            self._streams.advance(step.handle, step.request_id, step.num_prompt_tokens,
                                  step.block_ids, step.num_ready_tokens, step.num_target_tokens)

    def layer_saved(self, layer_name: str) -> None:
        """The step's forward pass has written this layer (save_kv_layer)."""
        if self._streams is not None and (index := self._layer_index.get(layer_name)) is not None:
            self._streams.mark_layer(index)

    def step_saved(self) -> None:
        """The step's forward pass is over (wait_for_save): every layer is written."""
        if self._streams is not None:
            self._streams.mark_all()

    def grant(self, leases: list[LeaseSpec]) -> None:
        """Hold the blocks the scheduler published, until released or expired."""
        for lease in leases:
            self.leases.grant(lease.handle, lease.request_id, lease.block_ids, lease.lease_s)

    def take_freed(self) -> set[str]:
        """Requests whose blocks vLLM may reuse now (each reported once)."""
        freed = self.leases.take_freed() | self._freeing
        if self._streams is not None:
            # never hand blocks back to vLLM while a stream reader may still read them
            self._freeing = self._streams.drop_requests(freed)
            freed -= self._freeing
        return freed

    @property
    def num_streams(self) -> int:
        return self._streams.num_streams if self._streams is not None else 0

    def shutdown(self) -> None:
        self._stopped.set()
        self._reaper.join()
        self.leases.revoke_all()
        self._server.stop(grace_s=0.5)

    def _reap_leases(self) -> None:
        while not self._stopped.is_set():
            self.leases.expire()
            next_deadline = self.leases.next_deadline_s
            wait_s = MAX_REAP_INTERVAL_S
            if next_deadline is not None:
                wait_s = min(wait_s, max(0.01, next_deadline - time.monotonic()))
            self._stopped.wait(wait_s)
