"""Producer leases: grant, pull, release, expiry, and exactly-once freeing."""

from __future__ import annotations

import threading

import pytest

from kv_transfer.leases import ExpiredHandle, LeaseError, LeaseTable, UnknownHandle


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_release_frees_blocks_once():
    # 1. grant  2. release  3. freed reported exactly once
    table = LeaseTable()
    table.grant("h", "req", (1, 2, 3), lease_s=5)
    assert table.num_leased_blocks == 3
    assert table.release("h") == 3
    assert table.take_freed() == {"req"}
    assert table.take_freed() == set()
    assert table.release("h") == 0
    assert table.num_leases == 0


def test_expiry_frees_only_overdue_leases():
    clock = FakeClock()
    table = LeaseTable(clock=clock)
    table.grant("a", "req-a", (1,), lease_s=5)
    table.grant("b", "req-b", (2,), lease_s=50)
    clock.now += 10
    assert table.expire() == 1
    assert table.take_freed() == {"req-a"}
    assert table.next_deadline_s == pytest.approx(150.0)
    with pytest.raises(ExpiredHandle, match="expired"):
        table.acquire("a", [1])
    table.release("b")
    assert table.num_leases == 0


def test_a_lease_being_read_is_freed_only_after_the_read():
    clock = FakeClock()
    table = LeaseTable(clock=clock)
    table.grant("h", "req", (4, 5), lease_s=1)
    table.acquire("h", [5])
    clock.now += 2
    table.expire()
    assert table.take_freed() == set(), "blocks freed under an active reader"
    table.finish_pull("h")
    assert table.take_freed() == {"req"}


def test_acquire_checks_blocks_and_handles():
    table = LeaseTable()
    table.grant("h", "req", (1, 2), lease_s=5)
    with pytest.raises(LeaseError, match="not part of this lease"):
        table.acquire("h", [1, 3])
    with pytest.raises(UnknownHandle):
        table.acquire("other", [1])
    table.release("h")


def test_acquire_waits_for_a_handle_granted_moments_later():
    table = LeaseTable()
    timer = threading.Timer(0.05, table.grant, args=("late", "req", (9,), 5.0))
    timer.start()
    lease = table.acquire("late", [9], wait_s=2.0)
    assert lease.request_id == "req"
    table.finish_pull("late")
    table.release("late")
    timer.join()


def test_revoke_all_frees_everything():
    table = LeaseTable()
    for i in range(3):
        table.grant(f"h{i}", f"r{i}", (i,), lease_s=5)
    table.revoke_all()
    assert table.take_freed() == {"r0", "r1", "r2"}
    assert table.num_leases == 0


def test_granting_a_handle_twice_is_a_bug():
    table = LeaseTable()
    table.grant("h", "req", (1,), lease_s=5)
    with pytest.raises(AssertionError):
        table.grant("h", "req2", (2,), lease_s=5)
