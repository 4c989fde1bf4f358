"""Batching a token stream across a process hop: fewer, larger messages, first one at once.

Every message a replica streams back through Ray costs CPU on both ends whatever it carries,
so a decode replica sends what its engine produced in the last `interval_s` as one message
(as Ray Serve LLM does, 50 ms by default) instead of one message per engine step:
  1. the first item goes out as soon as it exists (TTFT is never delayed);
  2. later items wait until `interval_s` has passed since the previous message, merged;
  3. an item that ends the stream (`is_final`) flushes at once, with whatever waits;
  4. an error from the source is raised after the items before it were sent.
Closing the batched stream (the caller went away) closes the source, which aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


async def coalesce(source: AsyncIterator[T], interval_s: float,
                   merge: Callable[[list[T]], T],
                   is_final: Callable[[T], bool]) -> AsyncIterator[T]:
    """`source`'s items, merged so that at most one message goes out per interval_s."""
    if interval_s <= 0:
        async for item in source:
            yield item
        return
    loop = asyncio.get_running_loop()
    buffer: list[T] = []
    ready, urgent = asyncio.Event(), asyncio.Event()
    failure: list[BaseException] = []

    async def pump() -> None:
        try:
            async for item in source:
                buffer.append(item)
                ready.set()
                if is_final(item):
                    urgent.set()
        except Exception as err:  # noqa: BLE001 - handed to the consumer, raised there
            failure.append(err)
        finally:
            urgent.set()
            ready.set()

    task = asyncio.ensure_future(pump())
    next_due = 0.0
    try:
        while True:
            await ready.wait()
            delay = next_due - loop.time()
            if delay > 0 and not urgent.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(urgent.wait(), delay)
            ready.clear()
            items, buffer[:] = buffer[:], []
            if items:
                yield merge(items)
                next_due = loop.time() + interval_s
            if task.done() and not buffer:
                break
        if failure:
            raise failure[0]
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
