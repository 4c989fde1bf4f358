"""The quadratic prefill model and its fit (pure numpy)."""

from __future__ import annotations

import random

import pytest

from runtime.scheduler.prefill_model import PrefillFit, PrefillModel, fit

TRUE = PrefillModel(a_ms=4.0, b_ms=0.03, c_ms=6e-6)  # 8K tokens: 4 + 246 + 403 ms


def test_fit_recovers_a_quadratic_from_noisy_samples():
    rng = random.Random(0)
    samples = [(n, TRUE.predict_ms(n) * rng.uniform(0.9, 1.1))
               for n in (64, 128, 256, 512, 1024, 2048, 4096, 8192) for _ in range(3)]
    model = fit(samples)
    assert model is not None
    for n in (100, 1000, 4000, 8000, 12000):
        assert model.predict_ms(n) == pytest.approx(TRUE.predict_ms(n), rel=0.1)
    assert model.c_ms > 0  # the attention term is found, not folded into the linear one


def test_fit_never_returns_a_negative_coefficient():
    # a purely linear engine, with noise that an unconstrained fit turns into c < 0
    samples = [(n, 2.0 + 0.05 * n - 1e-7 * n * n) for n in (100, 1000, 4000, 8000)]
    model = fit(samples)
    assert model is not None
    assert min(model.a_ms, model.b_ms, model.c_ms) >= 0
    assert model.predict_ms(4000) == pytest.approx(samples[2][1], rel=0.1)


def test_too_few_samples_keep_the_prior():
    fitter = PrefillFit(PrefillModel.from_throughput(10_000))
    fitter.add(1000, 50.0)
    assert fitter.model == PrefillModel.from_throughput(10_000)


def test_many_short_samples_do_not_push_out_the_long_ones():
    fitter = PrefillFit(PrefillModel.from_throughput(10_000))
    for n in (4096, 8192):
        fitter.add(n, TRUE.predict_ms(n))
    for i in range(5000):  # a day of chat traffic
        n = 100 + i % 400
        fitter.add(n, TRUE.predict_ms(n), refit=False)
    fitter.refit()
    assert fitter.num_samples < 200  # bounded
    assert fitter.model.predict_ms(8192) == pytest.approx(TRUE.predict_ms(8192), rel=0.05)


def test_chunk_cost_grows_with_its_position_in_the_prompt():
    early, late = TRUE.chunk_ms(0, 512), TRUE.chunk_ms(7680, 512)
    assert late > 2 * early
    # the chunks of a prompt add up to its prefill, without the per-request cost
    total = sum(TRUE.chunk_ms(p, 512) for p in range(0, 8192, 512))
    assert total == pytest.approx(TRUE.predict_ms(8192) - TRUE.a_ms)


def test_invalid_samples_are_ignored():
    fitter = PrefillFit(TRUE)
    for n, ms in ((0, 5.0), (100, 0.0), (100, float("nan")), (100, -1.0)):
        fitter.add(n, ms)
    assert fitter.num_samples == 0 and fitter.model == TRUE
