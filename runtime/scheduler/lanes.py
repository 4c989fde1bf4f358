"""Requests waiting for dispatch: first come first served within a lane, short lane first, and
no request passed over more than `max_pass_overs` times (no starvation)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from runtime.scheduler.types import Lane, RequestInfo


@dataclass
class _Waiting:
    request: RequestInfo
    num_passed_over: int = 0


@dataclass
class LaneQueues:
    max_pass_overs: int = 8
    _lanes: dict[Lane, deque[_Waiting]] = field(
        default_factory=lambda: {"short": deque(), "long": deque()}
    )

    def push(self, request: RequestInfo, lane: Lane) -> None:
        self._lanes[lane].append(_Waiting(request))

    def __len__(self) -> int:
        return sum(len(q) for q in self._lanes.values())

    def depth(self, lane: Lane) -> int:
        return len(self._lanes[lane])

    def pop(self) -> tuple[RequestInfo, Lane] | None:
        """The next request to dispatch: the short lane's head, unless the long lane's head has
        been passed over max_pass_overs times already."""
        short, long_ = self._lanes["short"], self._lanes["long"]
        if long_ and (not short or long_[0].num_passed_over >= self.max_pass_overs):
            return long_.popleft().request, "long"
        if not short:
            return None
        if long_:
            long_[0].num_passed_over += 1
        return short.popleft().request, "short"
