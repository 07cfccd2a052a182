"""Binning, jackknife and bootstrap errors (latflow.analysis.resampling) against AR(1) exact results and the
Gamma method."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import stat_seed
from scipy.signal import lfilter

from latflow.analysis import default_bin_size, gamma_method, gamma_method_derived, resample_error

A = 0.9
TAU_EXACT = (1 + A) / (2 * (1 - A))  # 9.5
N = 100_000
BIN = 200


def ar1(rng: np.random.Generator, n: int, a: float = A) -> np.ndarray:
    """Stationary AR(1) chain with unit innovations, shape (n,)."""
    eps = rng.standard_normal(n)
    eps[0] /= np.sqrt(1 - a**2)
    return lfilter([1.0], [1.0, -a], eps)


def binned_error_exact(n: int, bin_size: int, a: float = A) -> float:
    """Expected binned error of the mean of a stationary AR(1) series (unit innovations), bins of ``bin_size``.

    ``Var(bin mean) = sigma^2 / B [1 + 2 sum_{t=1}^{B-1} (1 - t/B) a^t]``, ``sigma^2 = 1 / (1 - a^2)``; the
    binned error is ``sqrt(Var(bin mean) / K)`` with ``K = n // B`` bins: it carries the finite-bin bias that the
    asymptotic ``sqrt(2 tau_int sigma^2 / n)`` does not.
    """
    t = np.arange(1, bin_size)
    var_bin = (1 + 2 * np.sum((1 - t / bin_size) * a**t)) / (1 - a**2) / bin_size
    return float(np.sqrt(var_bin / (n // bin_size)))


@pytest.fixture(scope="module")
def series() -> np.ndarray:
    return 0.7 + ar1(np.random.default_rng(stat_seed(515)), N)


@pytest.mark.statistical
@pytest.mark.parametrize("method", ["binning", "jackknife", "bootstrap"])
def test_primary_error_matches_ar1_and_gamma(series, method, record_z) -> None:
    res = resample_error(method, lambda x: x, [series], bin_size=BIN, seed=3)
    k = N // BIN
    assert (res.n_bins, res.bin_size, res.n) == (k, BIN, N)
    assert res.mean == pytest.approx(series.mean(), rel=1e-12)
    expected = binned_error_exact(N, BIN)
    # relative spread of an error from K nearly independent bins ~ 1/sqrt(2K); the bootstrap adds 1/sqrt(2 n_boot)
    spread = np.sqrt(1 / (2 * (k - 1)) + (1 / 2000 if method == "bootstrap" else 0.0))
    z = (res.err / expected - 1) / spread
    # bound 3.5: the three methods read one series (their z move together), swept over many seed offsets;
    # over 200 seeds the binning z has mean 0.01 and spread 0.95
    record_z(f"{method} error", z, bound=3.5)
    assert abs(z) < 3.5, (res.err, expected)
    # the Gamma method's error (asymptotic, 2 tau_int sigma^2 / N) is ~2 % above the finite-bin expectation
    gam = gamma_method(series)
    assert res.err == pytest.approx(gam.err, rel=0.08)


def test_jackknife_of_a_mean_is_the_binning_error(series) -> None:
    """For a linear function the delete-one-bin jackknife and the binned standard error are the same number."""
    jack = resample_error("jackknife", lambda x: x, [series], bin_size=BIN)
    binned = resample_error("binning", lambda x: x, [series], bin_size=BIN)
    assert jack.err == pytest.approx(binned.err, rel=1e-10)


@pytest.mark.statistical
@pytest.mark.parametrize("method", ["binning", "jackknife", "bootstrap"])
def test_derived_ratio_agrees_with_gamma(method) -> None:
    """A ratio of two correlated AR(1) means on two replicas: every method within a few percent of the Gamma method."""
    rng = np.random.default_rng(stat_seed(77))
    x = [2.0 + ar1(rng, 60_000), 2.0 + ar1(rng, 40_000)]
    y = [1.0 + 0.5 * xi + 0.3 * ar1(rng, xi.size, 0.5) for xi in x]
    ratio = lambda a, b: a / b  # noqa: E731
    gam = gamma_method_derived(ratio, [x, y])
    res = resample_error(method, ratio, [x, y], bin_size=BIN, seed=11)
    assert res.mean == pytest.approx(gam.mean, rel=1e-12)
    assert res.n_bins == 60_000 // BIN + 40_000 // BIN
    assert res.err == pytest.approx(gam.err, rel=0.1)


def test_bootstrap_is_seeded(series) -> None:
    one = resample_error("bootstrap", lambda x: x, [series[:5000]], bin_size=50, seed=5)
    again = resample_error("bootstrap", lambda x: x, [series[:5000]], bin_size=50, seed=5)
    other = resample_error("bootstrap", lambda x: x, [series[:5000]], bin_size=50, seed=6)
    assert one.err == again.err and one.err != other.err


def test_default_bin_size_rule() -> None:
    assert default_bin_size(9.5, [N]) == 190  # ceil(20 tau_int)
    assert default_bin_size(0.5, [N]) == 10
    assert default_bin_size(50.0, [500, 500]) == 50  # at least 20 bins in all
    assert default_bin_size(50.0, [30, 2000]) == 30  # never beyond the shortest replica


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "median"}, "allowed: jackknife, bootstrap, binning"),
        ({"bin_size": 0}, "bin size must be an integer >= 1"),
        ({"bin_size": 600}, "at least 2 are needed"),
    ],
)
def test_bad_requests(kwargs, message) -> None:
    args = {"method": "jackknife", "bin_size": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        resample_error(args.pop("method"), lambda x: x, [np.arange(1000.0)], **args)
