"""Whole requests on a prefill replica (rule 4 of the policy): when the decode pool is full,
and when decoding there adds less time in all than a local prefill or a split (pure Python)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from runtime.scheduler.decode_cost import decode_cost_ms, prefill_delay_ms
from runtime.scheduler.types import Decision, DecodeLoad
from runtime.scheduler.work import RECENT_TAU_S
from tests.unit.test_scheduler_policy import NOW, _req, _scheduler


def test_a_full_decode_pool_overflows_whole_requests_to_a_prefill_replica():
    sched = _scheduler(num_short=1, num_long=0, num_decode=1, local_max_prompt_tokens=None)
    sched.prefill.total_blocks[0] = sched.prefill.free_blocks[0] = 1000
    sched.decode.report(DecodeLoad("d0", 1000, 16, 8, 8, NOW))  # every sequence slot taken
    decision = sched.decide(_req(0, 300), NOW)
    assert decision.mode == "prefill_local" and decision.prefill_replica == "p0"
    assert "decode pool full" in decision.reason and sched.prefill.booked_seqs[0] == 1
    sched.decode.report(DecodeLoad("d0", 1000, 16, 2, 8, NOW))  # room again
    assert sched.decide(_req(1, 300), NOW).mode != "prefill_local"


def test_decode_heavy_load_is_balanced_onto_the_prefill_replica():
    sched = _scheduler(num_short=1, num_long=0, num_decode=1, local_max_prompt_tokens=0)
    sched.prefill.total_blocks[0] = sched.prefill.free_blocks[0] = 1000
    for table in (sched.prefill, sched.decode):  # a step: 3 ms + 0.5 ms a sequence
        table.report_decode_step(0, (3.0, 0.5))
    modes = []
    for i in range(8):
        decision = sched.decide(_req(i, 200, max_tokens=300), NOW + i)
        sched.first_token(decision, f"r{i}")
        modes.append(decision.mode)
    # both engines end up decoding about as many sequences
    assert abs(int(sched.prefill.booked_seqs[0]) - int(sched.decode.booked_seqs[0])) <= 2
    assert "prefill_local" in modes and "disaggregated" in modes
    # with a long prompt outstanding there, the prefill replica takes no more decodes
    sched.prefill.work.book(0, "long", "long", 8000, NOW + 10)
    assert sched.decide(_req(99, 200, max_tokens=300), NOW + 10).mode == "disaggregated"


def test_a_prefill_replica_busy_prefilling_decodes_nothing_more():
    """The decodes a prefill replica takes share its steps with the prefills it runs: at a
    high recent prefill utilization (no long prefill running at the moment) the same
    decode-heavy request stays with the decode replica that an idle prefill replica would
    have taken it from."""
    def decide_after(prefill_history_ms: float) -> str:
        sched = _scheduler(num_short=1, num_long=0, num_decode=1, local_max_prompt_tokens=0)
        sched.prefill.total_blocks[0] = sched.prefill.free_blocks[0] = 1000
        work = sched.prefill.work
        if prefill_history_ms:  # prompts prefilled there in the last seconds, all done
            work.recent_ms[0], work.recent_at[0] = prefill_history_ms, NOW
        for _ in range(4):  # four sequences decoding on the decode replica
            sched.decode.placed(0, sched.decode.blocks_for(500), 300)
        decision = sched.decide(_req(9, 200, max_tokens=300), NOW)
        assert isinstance(decision, Decision)
        return decision.mode

    assert decide_after(0.0) == "prefill_local"
    assert decide_after(4000.0) == "disaggregated"  # 4 s of prefills in the last 5 s


def test_recent_prefill_work_is_a_decaying_utilization():
    sched = _scheduler(num_short=1, num_long=0, num_decode=1)
    work = sched.prefill.work
    assert work.utilization(NOW)[0] == 0.0
    booked = work.book(0, "a", "short", 4000, NOW)  # about 0.4 s of prefill
    tau = RECENT_TAU_S
    assert work.utilization(NOW)[0] == pytest.approx(booked / (1e3 * tau))
    assert work.utilization(NOW + tau)[0] == pytest.approx(booked / (1e3 * tau) / np.e)
    for i in range(40):  # far more work than time: capped below 1
        work.book(0, f"b{i}", "long", 8000, NOW + 0.1 * i)
    assert 0.5 < work.utilization(NOW + 4)[0] < 1.0


def test_a_split_is_charged_its_prefill_where_it_runs():
    """Split, the prompt is prefilled on the prefill replica: its prefill delays the
    sequences decoding there, not those on the decode replica, which only receive its KV
    cache. The split cost the whole-request choice is weighed against says so."""
    sched = _scheduler(num_short=1, num_long=0, num_decode=1, local_max_prompt_tokens=0)
    sched.prefill.total_blocks[0] = sched.prefill.free_blocks[0] = 1000
    for _ in range(6):  # six sequences decoding on the decode replica
        sched.decode.placed(0, sched.decode.blocks_for(700), 300)
    request = _req(9, 400, max_tokens=300)
    of = sched.output_fraction
    delay_d = float(prefill_delay_ms(sched.decode, 400, of, 10.0)[0])
    assert delay_d > 5  # what a prefill there would cost its six sequences
    split_ms = float(sched.prefill.work.wait_ms(NOW, 400, "short")[0]) \
        + sched.handoff.first_ms
    expected = split_ms + sched.handoff.transfer_ms(400) \
        + float(decode_cost_ms(sched.decode, 400, 300, of, 10.0, NOW)[0]) - delay_d \
        + float(prefill_delay_ms(sched.prefill, 400, of, 10.0)[0])
    decision = sched.decide(request, NOW)
    assert isinstance(decision, Decision) and decision.mode == "prefill_local"
    charged = re.search(r"< (\d+) ms split", decision.reason)
    assert charged is not None, decision.reason
    assert float(charged.group(1)) == pytest.approx(expected, abs=1.0)


def test_prefill_replicas_decode_only_when_the_app_lets_them():
    from runtime.app_config import AppConfig
    from runtime.router import live_config

    def modes(prefill_replicas_decode: bool) -> set[str]:
        config = AppConfig.model_validate({
            "engine": {"model": "m"},
            "scheduler": {"prefill_replicas_decode": prefill_replicas_decode,
                          "local_max_prompt_tokens": 0}})
        sched = _scheduler(num_short=1, num_long=0, num_decode=1, local_max_prompt_tokens=0,
                           decode_balance=live_config(config).policy.decode_balance)
        sched.prefill.total_blocks[0] = sched.prefill.free_blocks[0] = 1000
        decisions = [sched.decide(_req(i, 200, max_tokens=300), NOW + i) for i in range(8)]
        return {d.mode for d in decisions if isinstance(d, Decision)}

    assert "prefill_local" in modes(True)
    assert modes(False) == {"disaggregated"}  # the decode replica has room for all eight


def test_a_short_prompt_is_not_moved_onto_a_prefill_replica_with_a_long_prefill_to_run():
    def decide(long_on_prefill_replica: bool) -> Decision:
        sched = _scheduler(num_short=1, num_long=0, num_decode=1, local_max_prompt_tokens=None)
        sched.prefill.total_blocks[0] = sched.prefill.free_blocks[0] = 1000
        for _ in range(6):  # the decode replica is busy decoding: decode time favours p0
            sched.decode.placed(0, 10, 1000)
        sched.decode.tpot_ms[0] = 5.0
        if long_on_prefill_replica:
            sched.prefill.work.book(0, "long", "long", 3000, NOW)
        decision = sched.decide(_req(0, 200, max_tokens=1000), NOW)
        assert isinstance(decision, Decision)
        return decision

    assert decide(False).mode == "prefill_local"  # no long prefill there: it balances decodes
    # p0 has a long prompt to prefill: the short one would share its steps with chunks of it
    # (first token ~100 ms), where the decode replica starts it now (16 ms)
    kept = decide(True)
    assert kept.mode == "local" and kept.predicted_ttft_ms < 20, kept.reason


def test_a_split_prefill_shares_its_steps_with_the_prefill_replicas_decodes():
    """A prefill replica that decodes whole requests runs their step with every step of a
    prompt it prefills: the split path's predicted first token counts them (one step per
    512-token chunk of a long prompt beside them), as a local prefill's does."""
    def split_ttft(decoding: bool, prompt_len: int) -> float:
        sched = _scheduler(num_short=1, num_long=0, num_decode=1, decode_balance=False)
        if decoding:
            sched.prefill.placed(0, sched.prefill.blocks_for(300), 200)
            sched.prefill.report_decode_step(0, (19.0, 1.0))  # 20 ms a step
        decision = sched.decide(_req(0, prompt_len), NOW)
        assert isinstance(decision, Decision) and decision.mode == "disaggregated"
        return decision.predicted_ttft_ms

    assert split_ttft(True, 300) == pytest.approx(split_ttft(False, 300) + 20.0)
    assert split_ttft(True, 2048) == pytest.approx(split_ttft(False, 2048) + 4 * 20.0)


def test_a_prompt_waits_for_the_decode_steps_of_the_prefills_ahead_of_it():
    """A prefill booked on a replica that decodes carries the steps it shares with those
    sequences: a long prompt held behind it waits for them too, and so does its prediction."""
    def held_wait(decoding: bool) -> tuple[float, float]:
        sched = _scheduler(num_short=1, num_long=0, num_decode=1, decode_balance=False)
        if decoding:
            sched.prefill.placed(0, sched.prefill.blocks_for(300), 200)
            sched.prefill.report_decode_step(0, (19.0, 1.0))  # 20 ms a step
        first = sched.prefill.book(0, "ahead", "long", 2048, NOW)
        sched.prefill.book(0, "held", "long", 2048, NOW)
        return first, sched.prefill.work.ahead_ms("held", NOW)

    alone, ahead_alone = held_wait(False)
    shared, ahead_shared = held_wait(True)
    assert shared == pytest.approx(alone + 4 * 20.0)  # four 512-token chunks, a step each
    assert ahead_shared == pytest.approx(ahead_alone + 4 * 20.0)
