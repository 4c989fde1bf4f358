"""Measure an engine's prefill time at a few prompt lengths when its replica starts.

The global scheduler fits each engine's quadratic prefill model (runtime/scheduler/
prefill_model.py) from these samples before the first request, then refines it online. A
prompt of random token ids per length (nothing from the prefix cache), one at a time on the
idle engine, twice per length (the faster counts), timed by the engine itself (scheduled ->
first token); lengths up to 8,192 tokens
or the context, whichever is shorter; a length is skipped once one prefill took longer than
`max_prefill_s` (a large model on slow hardware), so calibration stays short.

`calibrate_decode` then decodes a few tokens at a few batch sizes, so that the replica's
decode step model (runtime/scheduler/step_model.py, fitted from every decode step the engine
reports) can tell a step's fixed cost from its per-sequence cost before the first request:
a replica that only ever decodes one or two sequences at a time could not.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING

from runtime.engines import token_prompt
from runtime.requests import SamplingSpec

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

LENGTHS = (64, 256, 1024, 2048, 4096, 8192)


async def calibrate(engine: AsyncLLM, max_model_len: int, vocab_size: int,
                    max_prefill_s: float = 3.0, seed: int = 0) -> tuple[tuple[int, float], ...]:
    """((prompt tokens, prefill ms), ...) measured on `engine`, shortest first."""
    rng = random.Random(seed)
    params = SamplingSpec(max_tokens=1).to_vllm()
    samples = []
    lengths = [n for n in LENGTHS if n < max_model_len - 8]
    runs = 0

    async def run(n: int) -> tuple[float, float]:
        nonlocal runs
        runs += 1
        ids = [rng.randrange(3, vocab_size) for _ in range(n)]
        start = time.perf_counter()
        output = None
        async for output in engine.generate(token_prompt(ids), params,
                                            request_id=f"calibrate-{seed}-{runs}"):
            pass
        wall_ms = (time.perf_counter() - start) * 1e3
        return (_engine_ms(output.metrics, wall_ms) if output is not None else wall_ms), wall_ms

    await run(lengths[0])  # the first run warms the engine up
    for n in lengths:
        # the first prefill of a new length also pays one-off costs (kernels prepared for the
        # shape, allocations) that no later prompt pays: the faster of two runs counts
        first, wall_ms = await run(n)
        second, _ = await run(n)
        samples.append((n, min(first, second)))
        if wall_ms > 1e3 * max_prefill_s:
            break
    return tuple(samples)


def _engine_ms(metrics: object, wall_ms: float) -> float:
    scheduled = getattr(metrics, "scheduled_ts", 0.0)
    first_token = getattr(metrics, "first_token_ts", 0.0)
    return (first_token - scheduled) * 1e3 if scheduled and first_token else wall_ms


DECODE_BATCHES = (1, 4, 8)


async def calibrate_decode(engine: AsyncLLM, vocab_size: int, num_tokens: int = 32,
                           batches: tuple[int, ...] = DECODE_BATCHES, seed: int = 0) -> None:
    """Decode num_tokens tokens at each batch size in turn (16-token prompts, no early end):
    steps of every batch size for the engine's stat loggers to see."""
    rng = random.Random(seed)
    params = SamplingSpec(max_tokens=num_tokens, min_tokens=num_tokens,
                          ignore_eos=True).to_vllm()

    async def one(request_id: str) -> None:
        ids = [rng.randrange(3, vocab_size) for _ in range(16)]
        async for _ in engine.generate(token_prompt(ids), params,
                                       request_id=request_id):
            pass

    for batch in batches:
        await asyncio.gather(*(one(f"calibrate-decode-{seed}-{batch}-{i}")
                               for i in range(batch)))
