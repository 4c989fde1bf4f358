"""Cost per request on a real engine: vLLM's per-step times divided among the requests."""

from __future__ import annotations

import asyncio
import itertools
import os

import psutil
import pytest

from decode_workers.worker import DecodeWorker
from runtime.cost import RequestCost
from runtime.cost_tracker import CostTracker
from runtime.engine_config import EngineConfig
from runtime.engines import build_engine
from runtime.messages import DecodeTimings
from runtime.requests import GenerateRequest, SamplingSpec
from tests.integration.conftest import BLOCK_SIZE, EventLoopThread
from tests.integration.helpers import make_prompt

_ids = itertools.count()
_engine_processes: list[psutil.Process] = []  # the costed engine's, as it started


@pytest.fixture(scope="module")
def costed(tiny_model):
    """A colocated engine whose replica keeps per-request costs (1 per replica-hour)."""
    runner = EventLoopThread()
    costs = CostTracker(BLOCK_SIZE, cost_per_replica_hour=1.0, by_priority=True)

    async def start() -> DecodeWorker:
        config = EngineConfig(model=str(tiny_model), block_size=BLOCK_SIZE,
                              kv_cache_bytes=256 << 20, max_num_seqs=16, cpu_threads_bind="1")
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        engine = build_engine(config, "colocated", costs=costs)
        _engine_processes[:] = [p for p in psutil.Process().children(recursive=True)
                                if p.pid not in before and p.name().startswith("VLLM::")]
        return DecodeWorker(engine, BLOCK_SIZE, costs=costs)

    worker = runner.run(start())
    yield runner, worker, costs
    worker.shutdown()
    runner.stop()


async def _timings(worker: DecodeWorker, n: int, seed: int, max_tokens: int) -> DecodeTimings:
    request = GenerateRequest(f"cost-{next(_ids)}", make_prompt(n, seed),
                              SamplingSpec(max_tokens=max_tokens, ignore_eos=True))
    async for chunk in worker.decode(request, None, None):
        if chunk.timings is not None:
            return chunk.timings
    raise AssertionError("no final chunk")


def test_a_prompts_prefill_cost_grows_with_its_length(costed):
    """Prefill cost comes from the engine's own step times, in proportion to the work: per
    prompt token, a 4,000 token prefill costs at least about what a 500 token one does (the
    quadratic attention term only adds to it; how much depends on the machine, so the
    benchmarks print it), and a request's account is closed when it ends."""
    runner, worker, costs = costed
    runner.run(_timings(worker, 300, seed=900, max_tokens=2))  # warm-up
    per_token: dict[int, float] = {500: float("inf"), 4000: float("inf")}
    for seed in (901, 902):
        for n in per_token:
            timings = runner.run(_timings(worker, n, seed, max_tokens=2))
            assert timings.cost.prefill_engine_s > 0 and timings.cost.decode_engine_s > 0
            per_token[n] = min(per_token[n], timings.cost.prefill_engine_s / n)
    # a per-request or per-step price (not per unit of work) would make this ratio ~1/8
    assert per_token[4000] > 0.7 * per_token[500], per_token
    assert costs.ledger.num_open == 0, "every request's account was closed"


def test_the_requests_costs_add_up_to_the_engines_busy_time(costed):
    """Mixed prompts at once, chunked prefills sharing steps with decodes: the requests'
    shares account for the engine's busy time within 5%, and each one is priced."""
    runner, worker, costs = costed

    async def burst() -> list[DecodeTimings]:
        return await asyncio.gather(*(
            _timings(worker, n, seed=950 + i, max_tokens=12)
            for i, n in enumerate((60, 3000, 200, 1500, 90, 700))))

    busy_before = costs.usage().busy_s
    results = runner.run(burst())
    busy_s = costs.usage().busy_s - busy_before
    total = sum((t.cost for t in results), RequestCost())
    assert total.engine_s == pytest.approx(busy_s, rel=0.05), (total, busy_s)
    assert total.dollars == pytest.approx(total.engine_s / 3600)
    assert all(t.cost.decode_kv_block_s > 0 and t.cost.prefill_kv_block_s > 0
               for t in results)
    assert costs.ledger.num_open == 0


def test_decode_calibration_fits_the_engines_step_by_batch_size(costed):
    """A replica's decode calibration decodes at a few batch sizes; the step model its cost
    tracker fits from them (runtime/scheduler/step_model.py) has a per-sequence cost and
    predicts the time per token of a batch it never saw within 2x."""
    from runtime.calibration import calibrate_decode

    runner, worker, costs = costed
    runner.run(calibrate_decode(worker.engine, 256))
    model = costs.decode_steps.model
    assert model is not None and model.s1_ms > 0, model

    async def batch(n: int) -> list[DecodeTimings]:
        return await asyncio.gather(*(_timings(worker, 40, seed=950 + i, max_tokens=48)
                                      for i in range(n)))

    timings = runner.run(batch(6))
    per_token = sorted(t.decode_ms / 47 for t in timings)
    ratio = per_token[len(per_token) // 2] / model.step_ms(6)
    assert 0.5 <= ratio <= 2.0, (per_token, model)


def test_the_engine_is_one_process_on_its_cores(costed):
    """executor 'uni': the model runs in the engine core process, and with
    cpu_threads_bind every one of its threads runs on those cores (vLLM binds only a worker
    process's threads)."""
    assert [p.name() for p in _engine_processes] == ["VLLM::EngineCore"], _engine_processes
    threads = _engine_processes[0].threads()
    assert threads and all(os.sched_getaffinity(t.id) == {1} for t in threads)
