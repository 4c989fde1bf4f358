"""One API request, many generations: a batch of prompts, n samples each.

  1. every (prompt, sample) becomes a prepared request, booked with the scheduler at once (a
     429 for one is a 429 for all, before anything runs);
  2. the jobs run one after another, prompt by prompt, sample by sample: a prompt's later
     samples find it in the prefix cache (all but its last partial block);
  3. events come out tagged with their choice index (prompt * n + sample), and each choice
     ends with its finish reason and timings; an error in one ends them all.
"""

from __future__ import annotations

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
    """Every job's events, one job after another (a prompt's later samples find its prefix
    cached). Run concurrently (each choice's own router.stream, later samples after the
    first's first token), requests with n > 1 from three clients stalled the app within
    seconds: the replicas' load reports stopped reaching the ingress and every replica looked
    dead. A py-spy dump caught the ingress's event loop in Serve's request router, which
    retried full or slow-to-answer replicas without backing off (runtime/routing.py now tells
    it to back off). With that fix the same load (75 requests, three clients) ran without a
    stall, but its first request (a two-prompt batch, sent while the direct connections were
    still opening) hung until its 25 s deadline, cause not found; so choices stay
    sequential."""
    del n  # the order of the jobs is already prompt by prompt, sample by sample
    try:
        for job in jobs:
            async for event in router.stream(job.prepared):
                yield job, event
    finally:
        for job in jobs:  # never streamed (an error came first): bookings released
            router.discard(job.prepared)
