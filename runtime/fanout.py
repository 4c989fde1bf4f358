"""One API request, many generations: a batch of prompts, n samples each.

  1. every (prompt, sample) becomes a prepared request, booked with the scheduler at once (a
     429 for one is a 429 for all, before anything runs);
  2. the jobs run concurrently, each in a task with a fresh context; a prompt's later samples
     start after its first sample's first token, so they find it in the prefix cache (all but
     its last partial block);
  3. events come out tagged with their choice index (prompt * n + sample), and each choice
     ends with its finish reason and timings; an error in one ends them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from runtime.messages import PreparedRequest, TextEvent
from runtime.requests import SamplingSpec
from runtime.router import Router


@dataclass(frozen=True)
class Job:
    index: int  # the choice index
    prompt_index: int
    prepared: PreparedRequest


def plan(router: Router, prompts: list[list[int]], n: int, sampling: SamplingSpec,
         kind: str) -> list[Job]:
    """Prepare (and book) every choice; undoes the bookings if one is refused."""
    jobs: list[Job] = []
    try:
        for p, prompt_ids in enumerate(prompts):
            for sample in range(n):
                prepared = router.prepare(prompt_ids, _sample_spec(sampling, sample), kind)
                jobs.append(Job(p * n + sample, p, prepared))
    except BaseException:
        for job in jobs:
            router.discard(job.prepared)
        raise
    return jobs


def _sample_spec(sampling: SamplingSpec, sample: int) -> SamplingSpec:
    """A seeded request's samples get seed + index, as vLLM's parallel sampling does (one
    seed would give n equal samples)."""
    if sampling.seed is None or sample == 0:
        return sampling
    return replace(sampling, seed=sampling.seed + sample)


async def run(router: Router, jobs: list[Job], n: int) -> AsyncIterator[tuple[Job, TextEvent]]:
    """Every job's events, merged as they come.

    Concurrent choices had stalled the whole app under three clients; two causes, both in
    how Ray Serve was used. The request router (runtime/routing.py) now tells Serve to back
    off between routing tries (it had spun on queue-length probes and starved the ingress's
    event loop). And each choice runs in a task with a fresh context, not a copy of the
    request's: Ray Serve keeps the request it is serving in a context variable and tags the
    handle calls made under it with that request's id, and concurrent handle calls to one
    deployment sharing an id hung (4 concurrent two-prompt batches right after start, calls
    through Serve: 8 of 12 requests hung until their deadline with the copied context, 0 of
    12 with a fresh one).
    """
    if len(jobs) == 1:
        async for event in router.stream(jobs[0].prepared):
            yield jobs[0], event
        return
    queue: asyncio.Queue[tuple[Job, TextEvent] | BaseException | None] = asyncio.Queue()
    first_token = {job.prompt_index: asyncio.Event() for job in jobs}

    async def one(job: Job) -> None:
        try:
            if job.index % n:  # a later sample: after the first one's prefill
                await first_token[job.prompt_index].wait()
            async for event in router.stream(job.prepared):
                first_token[job.prompt_index].set()
                queue.put_nowait((job, event))
        except Exception as err:  # noqa: BLE001 - handed to the reader, raised there
            queue.put_nowait(err)
        finally:
            first_token[job.prompt_index].set()
            queue.put_nowait(None)

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(one(job), context=contextvars.Context()) for job in jobs]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for job in jobs:  # never streamed (an error came first): bookings released
            router.discard(job.prepared)
