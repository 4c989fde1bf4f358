"""Work left on an engine (runtime/scheduler/work.py), per lane: what finished late or ran
before a prompt came is no progress on it; pure Python, explicit clocks."""

from __future__ import annotations

import pytest

from tests.unit.test_scheduler_policy import NOW, _scheduler


def test_a_long_prefill_that_finished_late_is_no_progress_on_those_held_behind_it() -> None:
    """Three long prompts booked on one engine; the first takes twice its prediction. When
    it finishes, the second has just had its turn and the third waits: their whole predicted
    work is left (the first's overrun is not progress on them)."""
    work = _scheduler(num_short=1, num_long=0, num_decode=1).prefill.work
    predicted = [work.book(0, rid, "long", 4000, NOW) for rid in ("a", "b", "c")]
    done_s = NOW + 2 * predicted[0] / 1e3  # a took twice its predicted time
    work.finished("a", done_s)
    assert float(work.remaining_ms(done_s)[1][0]) == pytest.approx(predicted[1] + predicted[2])
    # half of b's predicted time later, half of b and all of c are left
    half_s = done_s + predicted[1] / 2e3
    assert float(work.remaining_ms(half_s)[1][0]) == pytest.approx(
        predicted[1] / 2 + predicted[2])
    assert work.ahead_ms("c", half_s) == pytest.approx(predicted[1] / 2)


def test_a_short_prompt_sent_during_a_long_prefill_has_all_its_work_left() -> None:
    """The engine's time on the long prefill before the short prompt came is no progress on
    it; once it is sent, it goes first (priority)."""
    work = _scheduler(num_short=1, num_long=0, num_decode=1).prefill.work
    work.book(0, "long", "long", 6000, NOW)
    sent_s = NOW + 0.5
    short_ms = work.book(0, "short", "short", 300, sent_s)
    assert float(work.remaining_ms(sent_s)[0][0]) == pytest.approx(short_ms)
    assert float(work.remaining_ms(sent_s + short_ms / 2e3)[0][0]) == pytest.approx(
        short_ms / 2)
    work.finished("short", sent_s + short_ms / 1e3)
    assert float(work.remaining_ms(sent_s + short_ms / 1e3)[0][0]) == 0.0
