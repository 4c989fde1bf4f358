"""What a request cost, by phase: each engine step's time divided among the requests in it.

- `StepLedger` takes one engine step at a time: its duration, the prompt tokens it computed
  for each prefilling request, and the requests it decoded one token for. The step's time is
  divided by scheduled tokens (a prefill's share is its prompt tokens, each decoding sequence's
  share is its one token), so a step's shares, plus the part of it no known request took part
  in, add up to the step's time exactly. Blocks held x time accumulate the same way.
- `RequestCost` is one request's total: engine-seconds and KV block-seconds by phase, KV bytes
  moved and, at a price per replica-hour, dollars. Costs of the replicas a request ran on add.
- `EngineUsage` is an engine's busy time against its wall time: idle capacity is reported
  apart, never smeared over requests.
No Ray and no engine here; runtime/cost_tracker.py works out who was in each step.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Literal

Phase = Literal["prefill", "decode"]
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class RequestCost:
    """One request's share of the engines it ran on. Prefill and decode are phases, not
    pools: a decode replica that prefills a prompt itself (local mode) books prefill time."""

    prefill_engine_s: float = 0.0
    decode_engine_s: float = 0.0
    prefill_kv_block_s: float = 0.0  # prompt blocks while computed, and under the lease
    decode_kv_block_s: float = 0.0
    bytes_moved: int = 0  # KV bytes moved between the pools
    dollars: float = 0.0  # engine-seconds at each pool's price per replica-hour

    @property
    def engine_s(self) -> float:
        return self.prefill_engine_s + self.decode_engine_s

    def __add__(self, other: RequestCost) -> RequestCost:
        return RequestCost(
            self.prefill_engine_s + other.prefill_engine_s,
            self.decode_engine_s + other.decode_engine_s,
            self.prefill_kv_block_s + other.prefill_kv_block_s,
            self.decode_kv_block_s + other.decode_kv_block_s,
            self.bytes_moved + other.bytes_moved,
            self.dollars + other.dollars,
        )

    def priced(self, cost_per_replica_hour: float) -> RequestCost:
        """This cost with its engine-seconds (on one pool) turned into dollars."""
        return replace(self, dollars=self.dollars + dollars(self.engine_s, cost_per_replica_hour))


def dollars(engine_s: float, cost_per_replica_hour: float) -> float:
    """The price of engine_s seconds of one replica at cost_per_replica_hour."""
    assert engine_s >= 0 and cost_per_replica_hour >= 0, "cost and time are never negative"
    return engine_s * cost_per_replica_hour / SECONDS_PER_HOUR


@dataclass(frozen=True)
class EngineUsage:
    """How much of an engine's time went to steps, and how much of that to known requests
    (the rest: warm-up, calibration, requests it was not told of)."""

    busy_s: float
    wall_s: float
    attributed_s: float

    @property
    def idle_s(self) -> float:
        return max(0.0, self.wall_s - self.busy_s)

    @property
    def unattributed_s(self) -> float:
        return max(0.0, self.busy_s - self.attributed_s)

    @property
    def busy_fraction(self) -> float:
        return self.busy_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(slots=True)
class _Account:
    prefill_engine_s: float = 0.0
    decode_engine_s: float = 0.0
    prefill_kv_block_s: float = 0.0
    decode_kv_block_s: float = 0.0


class StepLedger:
    """Accumulates each open request's share of every engine step it took part in.

    Called from one thread (the replica's event loop), once per engine step, in step order.
    """

    def __init__(self) -> None:
        self._accounts: dict[str, _Account] = {}
        self.busy_s = 0.0
        self.attributed_s = 0.0

    def record_step(self, duration_s: float, prefill_tokens: Mapping[str, int],
                    decoding: Collection[str], num_other_tokens: int = 0) -> dict[str, float]:
        """Divide one step of duration_s among its requests: each prefilling one by the prompt
        tokens it computed, each decoding one by its one token. num_other_tokens: tokens the
        step computed for no known request (their share is busy but unattributed). Returns
        each request's share; the shares and the unattributed part sum to duration_s."""
        assert duration_s >= 0, f"a step cannot take {duration_s} s"
        assert prefill_tokens.keys().isdisjoint(decoding), "a request prefills or decodes in a step"
        num_tokens = sum(prefill_tokens.values()) + len(decoding) + num_other_tokens
        self.busy_s += duration_s
        if num_tokens == 0:
            return {}
        per_token_s = duration_s / num_tokens
        shares: dict[str, float] = {}
        accounts = self._accounts  # the loops below run for every sequence of every step
        for request_id, n in prefill_tokens.items():
            assert n > 0, "a prefill share needs tokens"
            share = shares[request_id] = n * per_token_s
            account = accounts.get(request_id)
            if account is None:
                account = accounts[request_id] = _Account()
            account.prefill_engine_s += share
        for request_id in decoding:
            shares[request_id] = per_token_s
            account = accounts.get(request_id)
            if account is None:
                account = accounts[request_id] = _Account()
            account.decode_engine_s += per_token_s
        if num_other_tokens == 0 and shares:
            self.attributed_s += duration_s  # all of it, without rounding away a remainder
        else:
            self.attributed_s += sum(shares.values())
        return shares

    def hold_blocks(self, interval_s: float, num_blocks: Mapping[str, int],
                    phase: Phase) -> None:
        """Requests held num_blocks KV blocks each for interval_s, in phase."""
        assert interval_s >= 0, f"an interval cannot be {interval_s} s"
        for request_id, n in num_blocks.items():
            account = self._account(request_id)
            if phase == "prefill":
                account.prefill_kv_block_s += n * interval_s
            else:
                account.decode_kv_block_s += n * interval_s

    def close(self, request_id: str) -> RequestCost:
        """The request's accumulated cost (zero if it never took part in a step); forgets it."""
        account = self._accounts.pop(request_id, None)
        if account is None:
            return RequestCost()
        return RequestCost(
            prefill_engine_s=account.prefill_engine_s,
            decode_engine_s=account.decode_engine_s,
            prefill_kv_block_s=account.prefill_kv_block_s,
            decode_kv_block_s=account.decode_kv_block_s,
        )

    @property
    def num_open(self) -> int:
        return len(self._accounts)

    def _account(self, request_id: str) -> _Account:
        account = self._accounts.get(request_id)
        if account is None:
            account = self._accounts[request_id] = _Account()
        return account
