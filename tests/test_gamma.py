"""Tests of the Gamma method (latflow.analysis.gamma) on processes with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import stat_seed
from scipy.signal import lfilter

from latflow.analysis import GammaResult, gamma_method, gamma_method_derived

A = 0.9
TAU_EXACT = (1 + A) / (2 * (1 - A))  # 9.5
VAR_EXACT = 1.0 / (1 - A**2)  # unit innovations


def ar1(rng: np.random.Generator, n: int, a: float = A) -> np.ndarray:
    """Stationary AR(1) chain x_t = a x_{t-1} + eps_t, eps ~ N(0, 1), shape (n,)."""
    eps = rng.standard_normal(n)
    eps[0] /= np.sqrt(1 - a**2)  # start in equilibrium
    return lfilter([1.0], [1.0, -a], eps)


def reference_gamma(
    reps: list[np.ndarray], S: float = 1.5, known_mean: float | None = None
) -> tuple[float, float, float]:
    """Direct-sum (no FFT) implementation of the documented conventions.

    Returns (err, tau_int, tau_int_err).
    """
    n = sum(len(r) for r in reps)
    mean = np.concatenate(reps).mean() if known_mean is None else known_mean
    w_max = max(len(r) for r in reps) // 2
    gamma = np.zeros(w_max)
    for t in range(w_max):
        num = sum(float(np.dot(r[: len(r) - t] - mean, r[t:] - mean)) for r in reps if len(r) > t)
        den = sum(len(r) - t for r in reps if len(r) > t)
        gamma[t] = num / den
    tau_w = 0.5 + np.concatenate(([0.0], np.cumsum(gamma[1:] / gamma[0])))
    tau_w = np.maximum(tau_w, 0.5 + np.finfo(float).eps)
    for w in range(1, w_max):
        tau = S / np.log((2 * tau_w[w] + 1) / (2 * tau_w[w] - 1))
        if np.exp(-w / tau) - tau / np.sqrt(w * n) < 0 or w == w_max - 1:
            break
    dtau = 2 * tau_w[w] * np.sqrt((w + 0.5 - tau_w[w]) / n)
    if known_mean is not None:  # no mean estimated: no bias correction
        return np.sqrt(2 * tau_w[w] * gamma[0] / n), tau_w[w], dtau
    c_f = 2 * tau_w[w] * gamma[0] * (1 + (2 * w + 1) / n)
    return np.sqrt(c_f / n), tau_w[w] * (1 + (2 * w + 1) / n) / (1 + 1 / n), dtau


@pytest.mark.statistical
def test_ar1_tau_int_and_error(record_z) -> None:
    rng = np.random.default_rng(stat_seed(1234))
    n = 100_000
    x = ar1(rng, n)
    res = gamma_method(x)
    assert isinstance(res, GammaResult)
    assert res.n == n
    z_tau = (res.tau_int - TAU_EXACT) / res.tau_int_err
    record_z("tau_int", z_tau)
    assert abs(z_tau) < 3
    assert res.tau_int_err < 0.1 * TAU_EXACT  # the check above is not vacuous
    exact_err = np.sqrt(2 * TAU_EXACT * VAR_EXACT / n)
    # the error goes as sqrt(tau_int): its own relative error is about half of tau_int_err / tau_int (Wolff eq. 42)
    z_err = (res.err / exact_err - 1) / (0.5 * res.tau_int_err / res.tau_int)
    record_z("err", z_err)
    assert abs(z_err) < 3
    assert res.mean == pytest.approx(x.mean(), rel=1e-12)
    assert 1 <= res.window < n // 2


@pytest.mark.statistical
def test_ar1_z_scores_over_seeds(record_z) -> None:
    z = []
    for seed in range(20):
        res = gamma_method(ar1(np.random.default_rng(stat_seed(seed)), 20_000))
        z.append(res.mean / res.err)
    z = np.asarray(z)
    # 20 z-scores: |z| < 4 for each (family-wise p ~ 1e-3), and their chi^2 with 20 dof (p ~ 1e-3)
    record_z("max_abs_mean", float(np.max(np.abs(z))), bound=4.0)
    record_z("chi2_20dof", (float(np.sum(z**2)) - 20) / np.sqrt(40), bound=(45 - 20) / np.sqrt(40))
    assert np.all(np.abs(z) < 4)
    assert np.sum(z**2) < 45


@pytest.mark.statistical
def test_replicas_of_unequal_length(record_z) -> None:
    rng = np.random.default_rng(stat_seed(7))
    reps = [ar1(rng, 40_000), ar1(rng, 25_000), ar1(rng, 9_000) + 0.0]
    res = gamma_method(reps)
    n = sum(len(r) for r in reps)
    assert res.n == n
    assert res.mean == pytest.approx(np.concatenate(reps).mean(), rel=1e-12)
    z = (res.tau_int - TAU_EXACT) / res.tau_int_err
    record_z("tau_int", z)
    assert abs(z) < 3
    assert abs(res.err / np.sqrt(2 * TAU_EXACT * VAR_EXACT / n) - 1) < 0.15


def test_matches_direct_sum_reference() -> None:
    """FFT path, replica summation and global mean agree with a naive implementation."""
    rng = np.random.default_rng(11)
    reps = [ar1(rng, 700, 0.7) + 0.3, ar1(rng, 260, 0.7), ar1(rng, 31, 0.7) - 0.2]
    res = gamma_method(reps)
    err, tau, dtau = reference_gamma(reps)
    assert res.err == pytest.approx(err, rel=1e-10)
    assert res.tau_int == pytest.approx(tau, rel=1e-10)
    assert res.tau_int_err == pytest.approx(dtau, rel=1e-10)
    # the 2D-array form equals the sequence form
    two = rng.standard_normal((3, 500))
    assert gamma_method(two) == gamma_method(list(two))


@pytest.mark.statistical
def test_white_noise(record_z) -> None:
    rng = np.random.default_rng(stat_seed(3))
    n = 20_000
    x = 2.0 + 0.5 * rng.standard_normal(n)
    res = gamma_method(x)
    assert abs(res.tau_int - 0.5) < 0.05
    assert res.tau_int >= 0.5
    assert abs(res.err / (0.5 / np.sqrt(n)) - 1) < 0.05
    z = (res.mean - 2.0) / res.err
    record_z("mean", z, bound=4.0)
    assert abs(z) < 4


def test_derived_linear_is_exact() -> None:
    """For a linear function the projected series is the series of the function."""
    rng = np.random.default_rng(5)
    x, y = ar1(rng, 5000, 0.8) + 1.0, ar1(rng, 5000, 0.5) - 2.0
    res = gamma_method_derived(lambda a, b: 2 * a - 3 * b + 1, [x, y])
    ref = gamma_method(2 * x - 3 * y + 1)
    assert res.mean == pytest.approx(2 * x.mean() - 3 * y.mean() + 1, rel=1e-12)
    assert res.err == pytest.approx(ref.err, rel=1e-8)
    assert res.tau_int == pytest.approx(ref.tau_int, rel=1e-8)
    assert res.window == ref.window


@pytest.mark.statistical
def test_derived_ratio_against_repetitions(record_z) -> None:
    """Error of <x>/<y> agrees with the spread over independent repetitions."""
    rng = np.random.default_rng(stat_seed(99))
    values, errors = [], []
    for _ in range(300):
        common = ar1(rng, 3000, 0.8)
        x = 1.0 + common
        y = 2.0 + 0.5 * common + ar1(rng, 3000, 0.6)
        res = gamma_method_derived(lambda a, b: a / b, [x, y])
        values.append(res.mean)
        errors.append(res.err)
    spread = np.std(values, ddof=1)
    # the sample standard deviation of 300 values has a relative error 1/sqrt(2 * 299)
    z_err = (np.mean(errors) / spread - 1) / np.sqrt(1 / (2 * (len(values) - 1)))
    record_z("err_vs_spread", z_err)
    assert abs(z_err) < 3
    assert abs(np.mean(values) - 0.5) < 4 * spread / np.sqrt(len(values)) + 0.01


def test_derived_structure_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        gamma_method_derived(lambda a, b: a * b, [np.ones(10), np.ones(11)])


@pytest.mark.statistical
def test_known_mean(record_z) -> None:
    rng = np.random.default_rng(stat_seed(21))
    x = ar1(rng, 50_000)
    free = gamma_method(x)
    fixed = gamma_method(x, known_mean=0.0)
    assert fixed.mean == free.mean  # the estimate is still the sample mean
    assert abs(fixed.err / free.err - 1) < 0.1
    z = (fixed.tau_int - TAU_EXACT) / fixed.tau_int_err
    record_z("tau_int_known_mean", z)
    assert abs(z) < 3
    # A frozen chain (constant, away from the exact mean) is not claimed precise.
    frozen = np.ones(1000)
    assert gamma_method(frozen).err == 0.0
    res = gamma_method(frozen, known_mean=0.0)
    assert res.mean == 1.0
    assert res.err > 0.3  # O(1): the distance to the exact mean
    assert res.tau_int > 100
    # Fluctuations about the known mean, no per-chain mean subtraction, no bias correction.
    reps = [ar1(rng, 400, 0.7) + 0.3, ar1(rng, 150, 0.7) - 0.1]
    res = gamma_method(reps, known_mean=0.05)
    err, tau, dtau = reference_gamma(reps, known_mean=0.05)
    assert res.err == pytest.approx(err, rel=1e-10)
    assert res.tau_int == pytest.approx(tau, rel=1e-10)
    assert res.tau_int_err == pytest.approx(dtau, rel=1e-10)
    assert gamma_method(x + 1.0, known_mean=0.0).err > 1.5 * free.err


def test_constant_and_short_series() -> None:
    res = gamma_method(np.full(100, 0.1))
    assert (res.mean, res.err, res.tau_int, res.tau_int_err) == (0.1, 0.0, 0.5, 0.0)
    res = gamma_method_derived(lambda a, b: a + b, [np.full(50, 0.3), np.full(50, 0.7)])
    assert res.err == 0.0 and res.tau_int == 0.5
    for n in (2, 3, 5):
        res = gamma_method(np.arange(n, dtype=float))
        assert np.isfinite(res.err) and res.err > 0 and res.tau_int >= 0.5
    res = gamma_method([1.0, 2.0])
    assert res.window == 0 and res.err == pytest.approx(np.sqrt(0.25 * 1.5 / 2))
    with pytest.raises(ValueError):
        gamma_method(np.array([1.0]))
    with pytest.raises(ValueError):
        gamma_method(np.array([1.0, np.nan, 2.0]))
    with pytest.raises(ValueError):
        gamma_method(np.zeros(10), S=-1.0)


def test_as_dict_is_plain() -> None:
    import json

    d = gamma_method(np.random.default_rng(0).standard_normal(100)).as_dict()
    assert set(d) == {"mean", "err", "tau_int", "tau_int_err", "n"}
    assert all(type(v) in (float, int) for v in d.values())
    json.dumps(d)


# ---- agreement with pyerrors (same conventions: should agree to rounding) ----

RTOL = 1e-6


def _pe_check(res: GammaResult, obs, name: str = "ens") -> None:
    assert res.mean == pytest.approx(obs.value, rel=1e-12, abs=1e-14)
    assert res.tau_int == pytest.approx(obs.e_tauint[name], rel=RTOL)
    assert res.tau_int_err == pytest.approx(obs.e_dtauint[name], rel=RTOL, abs=1e-14)
    assert res.err == pytest.approx(obs.dvalue, rel=RTOL)


@pytest.mark.parametrize(("a", "n"), [(0.9, 50_000), (0.0, 10_000), (0.5, 40), (0.3, 7), (0.95, 3_000)])
def test_pyerrors_single_chain(a: float, n: int) -> None:
    pe = pytest.importorskip("pyerrors")
    x = 1.5 + ar1(np.random.default_rng(int(100 * a) + n), n, a)
    obs = pe.Obs([x], ["ens"])
    obs.gamma_method(S=1.5)
    _pe_check(gamma_method(x, S=1.5), obs)


def test_pyerrors_replicas() -> None:
    pe = pytest.importorskip("pyerrors")
    rng = np.random.default_rng(42)
    r1, r2 = ar1(rng, 30_000), ar1(rng, 12_000)
    # pyerrors subtracts each replica's own mean, we subtract the overall mean
    # (Wolff sec. 3). With equal replica means the two coincide exactly ...
    r1c, r2c = r1 - r1.mean() + 0.25, r2 - r2.mean() + 0.25
    obs = pe.Obs([r1c, r2c], ["ens|r1", "ens|r2"])
    obs.gamma_method(S=1.5)
    _pe_check(gamma_method([r1c, r2c], S=1.5), obs)
    # ... and otherwise differ at order (2W+1)/N only.
    obs = pe.Obs([r1, r2], ["ens|r1", "ens|r2"])
    obs.gamma_method(S=1.5)
    res = gamma_method([r1, r2], S=1.5)
    assert res.mean == pytest.approx(obs.value, rel=1e-10)
    assert res.err == pytest.approx(obs.dvalue, rel=0.02)
    assert res.tau_int == pytest.approx(obs.e_tauint["ens"], rel=0.02)


def test_pyerrors_derived() -> None:
    pe = pytest.importorskip("pyerrors")
    volume = 16.0
    m = 0.8 + ar1(np.random.default_rng(8), 20_000, 0.9) / 3
    res = gamma_method_derived(lambda m2, am: volume * (m2 - am**2), [m**2, np.abs(m)], S=1.5)
    o2, o1 = pe.Obs([m**2], ["ens"]), pe.Obs([np.abs(m)], ["ens"])
    chi = volume * (o2 - o1**2)
    chi.gamma_method(S=1.5)
    _pe_check(res, chi)
