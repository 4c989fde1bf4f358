"""What a long prefill costs the short prompts arriving meanwhile (scheduler/isolation.py)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.scheduler.isolation import ArrivalRate, short_cost_ms
from runtime.scheduler.loads import DecodeTable, PrefillTable
from runtime.scheduler.prefill_model import PrefillModel

NOW = 1000.0
MODEL = PrefillModel(1.0, 0.05, 1e-5)


def _tables(num_decode: int = 2) -> tuple[PrefillTable, DecodeTable]:
    prefill = PrefillTable(["p0"], ["short"], MODEL)
    decode = DecodeTable([f"d{i}" for i in range(num_decode)], [1000] * num_decode,
                         block_size=16, max_num_seqs=8, prior=MODEL)
    return prefill, decode


def test_the_arrival_rate_follows_a_steady_stream_and_decays_after_it():
    rate = ArrivalRate()
    assert rate.per_s(NOW) == 0.0
    for i in range(400):  # 4 per second for 100 s
        rate.arrived(NOW - 100 + i / 4)
    assert rate.per_s(NOW) == pytest.approx(4.0, rel=0.02)
    assert rate.per_s(NOW + 10) == pytest.approx(4.0 / np.e, rel=0.02)


def test_a_long_prefill_costs_short_prompts_only_while_no_engine_is_free_of_long_ones():
    prefill, decode = _tables(num_decode=2)
    live_p, live_d = np.ones(1, dtype=bool), np.ones(2, dtype=bool)
    prefill.work.book(0, "a", "long", 6000, NOW)  # ~0.66 s of long work on p0
    decode.work.book(0, "b", "long", 3000, NOW)  # ~0.24 s on d0; d1 is free
    p_cost, d_cost = short_cost_ms(prefill, decode, live_p, live_d, 6000, 4.0, NOW)
    # on p0 or d0, d1 stays free for short prompts: no cost
    assert p_cost[0] == 0.0 and d_cost[0] == 0.0
    # on d1, every engine has long work until d0's ends (0.24 s, sooner than its own 0.66 s):
    # 4 short prompts a second each wait for two of its chunks (the step running, their own)
    chunk = float(decode.work.chunk_ms(6000)[1])
    assert d_cost[1] == pytest.approx(4.0 * MODEL.predict_ms(3000) / 1e3 * 2 * chunk, rel=0.01)
    # a dead engine takes no short prompts: d0 dead, placing on p0 leaves only d1 free
    p_cost, d_cost = short_cost_ms(prefill, decode, live_p, np.array([False, True]), 6000,
                                   4.0, NOW)
    assert p_cost[0] == 0.0 and d_cost[1] > 0.0
    # no short prompts arriving: no cost anywhere
    p_cost, d_cost = short_cost_ms(prefill, decode, live_p, live_d, 6000, 0.0, NOW)
    assert not p_cost.any() and not d_cost.any()
