"""A stand-in nccl producer in its own process, which can die in the middle of a transfer.

It serves synthetic blocks with the tiny model's per-layer block bytes through the real
producer code (ControlServer with the collective channel, gloo), so a real decode engine pulls
from it.
With `die_after_chunks`, the process exits hard (no clean-up, like a crash) right after sending
that many chunks of a transfer.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from kv_transfer.layout import KVLayout

TOKEN_FIELD = "auth_token"


def model_layout(model_dir: Path, block_size: int) -> KVLayout:
    """The KV layout a float32 engine of this checkpoint has (its connector states the same at
    the handshake)."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    num_kv_heads, num_layers = config["num_key_value_heads"], config["num_hidden_layers"]
    per_layer = 2 * num_kv_heads * head_dim * block_size * 4
    return KVLayout(num_layers, num_kv_heads, head_dim, "float32", block_size,
                    (per_layer,) * num_layers)


def _serve(port: int, token: str, layout: KVLayout, num_blocks: int, die_after_chunks: int,
           ctl: Connection) -> None:
    from kv_transfer.channels import pair_group as collective
    from kv_transfer.channels.base import ChannelOptions, WorkerIdentity
    from kv_transfer.control_server import ControlServer
    from kv_transfer.leases import LeaseTable
    from kv_transfer.paged_kv import PagedKVCache

    if die_after_chunks:
        real_send = collective.PairGroup.send
        sent = [0]

        def send_then_die(self: collective.PairGroup, tensor: torch.Tensor) -> None:
            real_send(self, tensor)
            sent[0] += 1
            if sent[0] >= die_after_chunks:
                os._exit(1)

        collective.PairGroup.send = send_then_die  # type: ignore[method-assign]

    shape = (num_blocks, layout.block_bytes_per_layer[0] // 4)
    layers = {f"layer.{i}": torch.randn(shape) for i in range(layout.num_layers)}
    cache = PagedKVCache(layers, num_blocks)
    leases = LeaseTable()
    server = ControlServer(cache, leases, bind_host="127.0.0.1", port=port, auth_token=token,
                           max_chunk_bytes=1 << 20, handle_wait_s=1.0, channels=("nccl",),
                           options=ChannelOptions(WorkerIdentity("gloo", 1, 0), 5.0),
                           layout=layout)
    endpoint = server.start()
    ctl.send(endpoint)
    while True:
        command, arg = ctl.recv()
        if command == "grant":
            handle, block_ids = arg
            leases.grant(handle, "fake-request", tuple(block_ids), lease_s=30)
            ctl.send(None)
        elif command == "num_leases":
            leases.take_freed()
            ctl.send(leases.num_leases)
        else:
            server.stop(0)
            ctl.send(None)
            return


class FakeNcclProducer:
    """Drives the stand-in producer process from the test."""

    def __init__(self, port: int, token: str, model_dir: Path, block_size: int,
                 die_after_chunks: int = 0, num_blocks: int = 64) -> None:
        ctx = mp.get_context("spawn")
        self._ctl, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve,
            args=(port, token, model_layout(model_dir, block_size), num_blocks, die_after_chunks,
                  child),
            daemon=True,
        )
        self.process.start()
        self.endpoint: str = self._ctl.recv()

    def grant(self, handle: str, block_ids: list[int]) -> None:
        self._ctl.send(("grant", (handle, block_ids)))
        self._ctl.recv()

    def num_leases(self) -> int:
        self._ctl.send(("num_leases", None))
        return int(self._ctl.recv())

    def stop(self) -> None:
        if self.process.is_alive():
            self._ctl.send(("stop", None))
            self._ctl.recv()
        self.process.join(5)
