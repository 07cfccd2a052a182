"""Tests of the effective sample size and related helpers (latflow.analysis.ess)."""

from __future__ import annotations

import numpy as np
import pytest

from latflow.analysis import acceptance_rate, ess, reweighting_log_w


def test_equal_weights_give_one() -> None:
    assert ess(np.zeros(100)) == pytest.approx(1.0, rel=1e-14)
    assert ess(np.full(7, -3.2)) == pytest.approx(1.0, rel=1e-14)
    assert ess(np.zeros(100)) <= 1.0


def test_one_dominant_weight_gives_one_over_n() -> None:
    n = 50
    lw = np.full(n, -1e3)
    lw[17] = 0.0
    assert ess(lw) == pytest.approx(1.0 / n, rel=1e-12)
    lw = np.full(n, -np.inf)
    lw[3] = 5.0
    assert ess(lw) == pytest.approx(1.0 / n, rel=1e-14)


def test_matches_direct_formula_and_shift_invariance() -> None:
    rng = np.random.default_rng(0)
    lw = rng.normal(scale=1.3, size=1000)
    w = np.exp(lw)
    direct = w.sum() ** 2 / (lw.size * (w**2).sum())
    assert ess(lw) == pytest.approx(direct, rel=1e-12)
    for shift in (-700.0, 1e4, 1e6):
        assert ess(lw + shift) == pytest.approx(direct, rel=1e-9)
    assert 0.0 < ess(lw) <= 1.0


def test_large_log_weights_do_not_overflow() -> None:
    lw = np.array([1e4, 1e4, 1e4 - np.log(2.0), 1e4 + 1.0])
    w = np.exp(lw - 1e4)
    expected = w.sum() ** 2 / (4 * (w**2).sum())
    w_neg = np.exp(-lw + 1e4 - 1.0)
    expected_neg = w_neg.sum() ** 2 / (4 * (w_neg**2).sum())
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        assert ess(lw) == pytest.approx(expected, rel=1e-12)
        assert ess(-lw) == pytest.approx(expected_neg, rel=1e-12)
    assert np.isfinite(ess(np.array([1e4, -1e4])))


def test_invalid_input() -> None:
    with pytest.raises(ValueError):
        ess(np.array([]))
    with pytest.raises(ValueError):
        ess(np.array([0.0, np.nan]))
    with pytest.raises(ValueError):
        ess(np.full(3, -np.inf))


def test_reweighting_log_w_and_acceptance() -> None:
    log_p = np.array([-1.0, -2.0, -3.0])
    log_q = np.array([-1.5, -1.0, -3.0])
    np.testing.assert_allclose(reweighting_log_w(log_p, log_q), [0.5, -1.0, 0.0])
    with pytest.raises(ValueError):
        reweighting_log_w(log_p, log_q[:2])
    assert acceptance_rate(np.array([True, False, True, True])) == 0.75
    assert acceptance_rate(np.array([0, 1])) == 0.5
    with pytest.raises(ValueError):
        acceptance_rate(np.array([], dtype=bool))
