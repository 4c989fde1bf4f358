"""Two-rank torch.distributed groups between a producer and a consumer worker (torch only).

vLLM's workers already run torch.distributed for their own world, so a KV pair can neither join
that world nor use `new_group`. Each (producer, consumer) pair gets a standalone group instead,
built from plain torch objects: the producer's `TCPStore` for rendezvous, a `PrefixStore`
named after the group (so generations never share keys) and a `ProcessGroupNCCL` (GPUs) or
`ProcessGroupGloo` (CPU, the same code in CI) backend used for point-to-point send/recv only.
The producer is rank 0, the consumer rank 1. A group that fails once is closed and never used
again; the pair builds a new one under a new name.

This module imports no vLLM, so benchmarks/nccl_check.py can use it on a machine with PyTorch
alone.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from torch.distributed import PrefixStore, Store, TCPStore

from kv_transfer.kinds import CollectiveBackend

PRODUCER_RANK = 0
CONSUMER_RANK = 1
_TAG = 0  # one transfer at a time per group: ordering alone pairs sends with recvs


class GroupError(Exception):
    """A send, recv or rendezvous on a pair group failed; the group is closed."""


def host_store(bind_host: str, timeout_s: float) -> TCPStore:
    """The producer's rendezvous store (one per producer worker, any free port), listening on
    bind_host only.

    Given a host and port, TCPStore's server binds the wildcard address (every interface),
    whatever the host says; given `master_listen_fd`, it listens on that socket instead. So the
    socket is bound here and handed over: the libuv server (torch's default, pinned here)
    takes ownership of the descriptor and closes it with the store.
    """
    family = socket.getaddrinfo(bind_host, 0, type=socket.SOCK_STREAM)[0][0]
    listener = socket.create_server((bind_host, 0), family=family)
    try:
        store = TCPStore(bind_host, listener.getsockname()[1], is_master=True,
                         wait_for_workers=False, timeout=timedelta(seconds=timeout_s),
                         master_listen_fd=listener.fileno(), use_libuv=True)
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the descriptor now
    return store


def staging_device(backend: CollectiveBackend, cache_device: torch.device) -> torch.device:
    """Where a chunk sits while it is on the wire: NCCL moves GPU memory directly; gloo is the
    CPU test mode and stages through host memory."""
    return cache_device if backend == "nccl" else torch.device("cpu")


class PairGroup:
    """One side of a two-rank group. Sends and recvs block until done (or raise GroupError)."""

    def __init__(self, name: str, backend: CollectiveBackend, rank: int, store: Store,
                 timeout_s: float) -> None:
        self.name = name
        self.backend = backend
        self.rank = rank
        self.peer_rank = CONSUMER_RANK if rank == PRODUCER_RANK else PRODUCER_RANK
        self._closed = threading.Event()
        timeout = timedelta(seconds=timeout_s)
        prefixed = PrefixStore(f"disagg-kv/{name}", store)
        try:
            self._pg = _make_backend(backend, prefixed, rank, timeout)
        except Exception as err:  # noqa: BLE001 - rendezvous failures take many forms
            self._closed.set()
            raise GroupError(f"group {name}: rendezvous failed: {err}") from err

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    def send(self, tensor: torch.Tensor) -> None:
        self._run("send", lambda: self._pg.send([tensor], self.peer_rank, _TAG))

    def recv(self, tensor: torch.Tensor) -> None:
        self._run("recv", lambda: self._pg.recv([tensor], self.peer_rank, _TAG))

    def close(self) -> None:
        """Never use this group again (idempotent). Its sockets go with the object."""
        self._closed.set()

    def _run(self, op: str, start: Callable[[], Any]) -> None:
        if self._closed.is_set():
            raise GroupError(f"group {self.name} is closed")
        try:
            start().wait()
            if self.backend == "nccl":
                torch.cuda.current_stream().synchronize()
        except Exception as err:  # noqa: BLE001 - gloo/NCCL raise RuntimeError and friends
            self._closed.set()
            raise GroupError(f"group {self.name}: {op} failed: {err}") from err


def _make_backend(backend: CollectiveBackend, store: Store, rank: int,
                  timeout: timedelta) -> Any:
    """A torch backend object (ProcessGroupGloo / ProcessGroupNCCL) used for send/recv only."""
    from torch.distributed import distributed_c10d as c10d

    if backend == "gloo":
        return c10d.ProcessGroupGloo(store, rank, 2, timeout)
    options = c10d.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return c10d.ProcessGroupNCCL(store, rank, 2, options)
