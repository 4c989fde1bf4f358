"""Producer-side leases: which KV blocks are held for which consumer, and until when.

Lifecycle of a lease (a small state machine, one per published handle):
  1. `grant` when the producer's scheduler publishes the handle (state HELD).
  2. `acquire` / `finish_pull` bracket each pull; a lease being read is never freed under it.
  3. `release` by the consumer, `expire` past the deadline, or `revoke` on shutdown ends it
     (state FREED once no pull is reading it).
  4. `take_freed` hands the request ids whose blocks the engine may now reuse, exactly once each.
Thread-safe: the KV server's threads and the engine's worker thread call it concurrently.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class LeaseState(enum.Enum):
    HELD = "held"
    ENDING = "ending"  # released or expired while a pull still reads it
    FREED = "freed"


class LeaseError(Exception):
    """A pull or release named a handle that cannot be served."""


class UnknownHandle(LeaseError):
    pass


class ExpiredHandle(LeaseError):
    pass


@dataclass
class Lease:
    request_id: str
    block_ids: tuple[int, ...]
    deadline_s: float
    state: LeaseState = LeaseState.HELD
    num_readers: int = 0
    end_reason: str = ""
    block_set: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self.block_set = frozenset(self.block_ids)


class LeaseTable:
    """All leases of one producer worker, keyed by handle."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, num_tombstones: int = 4096):
        self._clock = clock
        self._cond = threading.Condition()
        self._leases: dict[str, Lease] = {}
        self._tombstones: dict[str, str] = {}
        self._num_tombstones = num_tombstones
        self._freed: list[str] = []

    def grant(
        self, handle: str, request_id: str, block_ids: tuple[int, ...], lease_s: float
    ) -> None:
        with self._cond:
            assert handle not in self._leases, f"handle granted twice for {request_id}"
            self._leases[handle] = Lease(request_id, block_ids, self._clock() + lease_s)
            self._cond.notify_all()

    def acquire(self, handle: str, block_ids: list[int], wait_s: float = 0.0) -> Lease:
        """Start a pull; waits up to wait_s for a handle that is about to be granted."""
        deadline = self._clock() + wait_s
        with self._cond:
            while handle not in self._leases:
                if handle in self._tombstones:
                    raise ExpiredHandle(f"lease {self._tombstones[handle]}")
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise UnknownHandle("unknown transfer handle")
                self._cond.wait(remaining)
            lease = self._leases[handle]
            if lease.state is not LeaseState.HELD:
                raise ExpiredHandle(f"lease {lease.end_reason}")
            if not lease.block_set.issuperset(block_ids):
                raise LeaseError("requested blocks are not part of this lease")
            lease.num_readers += 1
            return lease

    def finish_pull(self, handle: str) -> None:
        with self._cond:
            lease = self._leases.get(handle)
            if lease is None:
                return
            lease.num_readers -= 1
            assert lease.num_readers >= 0, "finish_pull without acquire"
            if lease.state is LeaseState.ENDING and lease.num_readers == 0:
                self._free(handle, lease)

    def release(self, handle: str) -> int:
        """End a lease at the consumer's request; returns the number of blocks it held."""
        return self._end(handle, "released")

    def expire(self) -> int:
        """End every lease past its deadline; returns how many ended."""
        now = self._clock()
        with self._cond:
            due = [h for h, lease in self._leases.items()
                   if lease.state is LeaseState.HELD and lease.deadline_s <= now]
        return sum(1 for handle in due if self._end(handle, "expired"))

    def revoke_all(self) -> None:
        with self._cond:
            handles = list(self._leases)
        for handle in handles:
            self._end(handle, "revoked")

    def take_freed(self) -> set[str]:
        """Request ids whose blocks were freed since the last call (each reported once)."""
        with self._cond:
            freed, self._freed = set(self._freed), []
            return freed

    @property
    def num_leases(self) -> int:
        with self._cond:
            return len(self._leases)

    @property
    def num_leased_blocks(self) -> int:
        with self._cond:
            return sum(len(lease.block_ids) for lease in self._leases.values())

    @property
    def next_deadline_s(self) -> float | None:
        with self._cond:
            held = [lease.deadline_s for lease in self._leases.values()
                    if lease.state is LeaseState.HELD]
            return min(held) if held else None

    def _end(self, handle: str, reason: str) -> int:
        with self._cond:
            lease = self._leases.get(handle)
            if lease is None or lease.state is not LeaseState.HELD:
                return 0
            lease.state, lease.end_reason = LeaseState.ENDING, reason
            if lease.num_readers == 0:
                self._free(handle, lease)
            return len(lease.block_ids)

    def _free(self, handle: str, lease: Lease) -> None:
        lease.state = LeaseState.FREED
        del self._leases[handle]
        self._tombstones[handle] = lease.end_reason
        if len(self._tombstones) > self._num_tombstones:
            self._tombstones.pop(next(iter(self._tombstones)))
        self._freed.append(lease.request_id)
        self._cond.notify_all()
