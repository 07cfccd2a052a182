"""Exact log Z (2D U(1), free phi^4), the exact charge distribution P(Q) of 2D U(1), and the sector check.

Exact values against docs/REFERENCES.md and against independent computations (derivatives of log Z, direct
quadrature, dense determinants, a discretised convolution, the moments of P(Q) from exact_q2); the sector
check against exact independent draws. Statistical tests take their seeds from ``stat_seed``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import stat_seed
from scipy import integrate
from scipy.special import ive

from latflow.analysis import SectorCheck, sector_check
from latflow.lattice import Lattice
from latflow.theories.phi4 import Phi4Params, Phi4Theory, free_log_z, free_phi2
from latflow.theories.u1 import (
    U1GaugeAction,
    U1Params,
    exact_log_z,
    exact_plaquette,
    exact_q2,
    exact_q_distribution,
    sample_exact_2d,
    sample_plaquettes_2d,
    topological_charge,
    von_mises_characteristic,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def exact_charges(beta: float, shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """Charges ``[n]`` of independent exact draws (plaquette sampler: ``Q = sum_x theta_p / 2pi``)."""
    plaq = sample_plaquettes_2d(beta, shape, n, gen(seed))
    return np.rint(plaq.flatten(1).sum(dim=1).numpy() / (2 * math.pi))


# --- exact log Z of 2D U(1) ----------------------------------------------------------------------


def test_exact_log_z_reference_value() -> None:
    """beta = 6, 16x16: 1077.2954 (docs/REFERENCES.md); 1x1: the plaquette is trivial, Z = e^beta."""
    assert abs(exact_log_z(6.0, (16, 16)) - 1077.2954) < 5e-5
    for beta in (0.0, 1.0, 7.5):
        assert exact_log_z(beta, (1, 1)) == pytest.approx(beta, abs=1e-12)
    assert exact_log_z(0.0, (8, 8)) == pytest.approx(0.0, abs=1e-14)
    assert math.isfinite(exact_log_z(50.0, (64, 64)))  # no overflow: V log I_0 is about 2e5


@pytest.mark.parametrize("beta", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("shape", [(4, 4), (8, 6)])
def test_exact_log_z_derivative_is_the_plaquette(beta: float, shape: tuple[int, int]) -> None:
    """``d log Z / d beta = V <cos theta_p>`` (central difference against :func:`exact_plaquette`)."""
    h = 1e-4
    deriv = (exact_log_z(beta + h, shape) - exact_log_z(beta - h, shape)) / (2 * h)
    v = shape[0] * shape[1]
    assert deriv == pytest.approx(v * exact_plaquette(beta, shape), rel=1e-8)


def test_u1_action_log_z_methods() -> None:
    theory = U1GaugeAction(U1Params(6.0), Lattice((16, 16)))
    assert theory.exact_log_z() == exact_log_z(6.0, (16, 16))
    assert theory.field_log_volume() == pytest.approx(512 * math.log(2 * math.pi), rel=1e-15)
    q, p = theory.exact_charge_distribution()
    q_ref, p_ref = exact_q_distribution(6.0, (16, 16))
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(p, p_ref)
    theory_3d = U1GaugeAction(U1Params(1.0), Lattice((4, 4, 4)))
    assert theory_3d.exact_log_z() is None
    assert theory_3d.field_log_volume() == pytest.approx(3 * 64 * math.log(2 * math.pi), rel=1e-15)
    with pytest.raises(ValueError, match="2D"):
        theory_3d.exact_charge_distribution()


# --- the exact charge distribution -------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0, 8.0])
def test_von_mises_characteristic_against_quad(beta: float) -> None:
    """``phi(k)`` at real ``k`` against scipy quad, and ``phi(n) = I_n / I_0`` at integers."""
    k = np.array([0.0, 0.3, 1.0, 2.7, 4.0, 11.5, 25.25])
    phi = von_mises_characteristic(beta, k)
    for ki, val in zip(k, phi):
        ref, _ = integrate.quad(
            lambda t, ki=ki: math.exp(beta * (math.cos(t) - 1)) * math.cos(ki * t), 0, math.pi, limit=200
        )
        assert val == pytest.approx(ref / (math.pi * ive(0, beta)), abs=1e-13)
    n = np.arange(6)
    np.testing.assert_allclose(von_mises_characteristic(beta, n), ive(n, beta) / ive(0, beta), rtol=0, atol=1e-14)


@pytest.mark.parametrize("beta", [1.0, 3.0, 6.0, 8.0])
@pytest.mark.parametrize("L", [4, 8, 16, 32])
def test_q_distribution_normalisation_and_second_moment(beta: float, L: int) -> None:
    """``sum_Q P(Q) = 1`` (Poisson summation: ``sum_Q 2 pi p_S(2 pi Q) = sum_n r_n^V``) and
    ``sum_Q Q^2 P(Q) = <Q^2>`` of :func:`exact_q2` (a different formula), symmetric and non-negative."""
    q, p = exact_q_distribution(beta, (L, L))
    assert q.dtype == np.int64 and p.dtype == np.float64 and q.shape == p.shape
    np.testing.assert_array_equal(q, np.arange(-q.max(), q.max() + 1))
    assert np.all(p >= 0)
    np.testing.assert_array_equal(p, p[::-1])
    assert abs(p.sum() - 1) < 1e-11
    q2 = exact_q2(beta, (L, L))
    assert abs(np.sum(q * q * p) - q2) < 1e-9 * max(1.0, q2)
    assert p[-1] < 1e-16 or q.max() == L * L // 2  # the automatic range reaches the negligible tail


def test_q_distribution_q_max_and_tiny_volumes() -> None:
    q, p = exact_q_distribution(6.0, (16, 16))
    q3, p3 = exact_q_distribution(6.0, (16, 16), q_max=3)
    np.testing.assert_array_equal(q3, np.arange(-3, 4))
    np.testing.assert_allclose(p3, p[np.abs(q) <= 3], rtol=0, atol=1e-17)
    q_all, p_all = exact_q_distribution(1.0, (4, 4), q_max=100)  # clipped to |Q| <= V/2
    assert q_all.max() == 8 and p_all[-1] == 0.0
    for shape in ((1, 1), (1, 2)):
        qq, pp = exact_q_distribution(2.0, shape, q_max=1)
        np.testing.assert_array_equal(pp, (qq == 0).astype(float))
    with pytest.raises(ValueError, match="too small"):
        exact_q_distribution(1.0, (1, 3))


def _convolution_p(beta: float, v: int, n_grid: int, q: np.ndarray) -> np.ndarray:
    """``P(Q)`` from the V-fold FFT convolution of the von Mises density discretised at cell midpoints.

    Cell ``j`` of width ``h = 2pi / n_grid`` carries mass ``f(t_j) h``; the sum of ``v`` angles then lives
    on ``v (-pi + h/2) + i h``, which contains ``2 pi Q``. The error is ``O(h^2)``.
    """
    h = 2 * math.pi / n_grid
    t = -math.pi + (np.arange(n_grid) + 0.5) * h
    mass = np.exp(beta * (np.cos(t) - 1)) / (2 * math.pi * ive(0, beta)) * h
    pmf = np.fft.irfft(np.fft.rfft(mass, v * n_grid) ** v, v * n_grid)
    idx = n_grid * (q + v // 2) - v // 2  # v even
    z = np.sum((ive(np.arange(-40, 41), beta) / ive(0, beta)) ** v)
    return 2 * math.pi * pmf[idx] / h / z


@pytest.mark.parametrize("beta", [1.0, 3.0, 6.0])
def test_q_distribution_against_discretised_convolution(beta: float) -> None:
    """4x4: a direct convolution, Richardson-extrapolated from 512 and 2048 cells (h^2 error), agrees."""
    q, p = exact_q_distribution(beta, (4, 4), q_max=4)
    coarse, fine = _convolution_p(beta, 16, 512, q), _convolution_p(beta, 16, 2048, q)
    assert np.max(np.abs(fine - p)) < 1e-7  # the discretisation error alone
    extrapolated = (16 * fine - coarse) / 15
    assert np.max(np.abs(extrapolated - p)) < 1e-10


def test_q_distribution_reference_values() -> None:
    """beta = 6, 16x16: the values quoted in docs/REFERENCES.md."""
    q, p = exact_q_distribution(6.0, (16, 16))
    got = {int(k): float(v) for k, v in zip(q, p) if abs(k) <= 3}
    assert got[0] == pytest.approx(0.36504095, abs=5e-9)
    assert got[1] == pytest.approx(0.24015679, abs=5e-9)
    assert got[2] == pytest.approx(0.06841099, abs=5e-9)
    assert got[3] == pytest.approx(0.00844791, abs=5e-9)


@pytest.mark.statistical
@pytest.mark.parametrize("beta", [1.5, 4.0])
def test_exact_sampler_charge_histogram(beta: float) -> None:
    """Charges of :func:`sample_exact_2d` (links, geometric Q) against P(Q): chi2 p > 1e-3; the same
    histogram against P(Q) at a 20% larger beta fails (the test has power)."""
    shape = (8, 8)
    theta = sample_exact_2d(beta, shape, 8000, gen(stat_seed(401 + int(2 * beta))))
    q = topological_charge(theta).numpy()
    assert np.max(np.abs(q - np.rint(q))) < 1e-9
    check = sector_check(q, exact_q_distribution(beta, shape))
    assert check.dof >= 4, check.summary()
    assert check.p_value > 1e-3, check.summary()
    assert np.all(np.abs(check.z[check.expected >= 5]) < 4.5), check.summary()  # |z| < 4.5 over ~10 sectors
    wrong = sector_check(q, exact_q_distribution(1.2 * beta, shape))
    assert wrong.p_value < 1e-6, wrong.summary()


# --- sector_check ------------------------------------------------------------------------------


def test_sector_check_by_hand() -> None:
    """Counts, pooling, chi2 and missing mass on a small hand-made example."""
    probs = (np.array([-2, -1, 0, 1, 2]), np.array([0.01, 0.2, 0.58, 0.2, 0.01]))
    q = np.array([0] * 60 + [1] * 18 + [-1] * 21 + [3]) + 1e-9  # rounding first; Q = 3 has P = 0
    check = sector_check(q, probs)
    assert isinstance(check, SectorCheck) and check.n_eff == 100
    np.testing.assert_array_equal(check.q, [-2, -1, 0, 1, 2, 3])
    np.testing.assert_array_equal(check.observed, [0, 21, 60, 18, 0, 1])
    np.testing.assert_allclose(check.expected, [1, 20, 58, 20, 1, 0])
    # the pool {-2, 2, 3, beyond the table} expects 2 < 5 draws, so it takes in the smallest bin (Q = -1):
    # bins 0, 1 and {-2, -1, 2, 3}, expected 58, 20, 22, observed 60, 18, 22
    chi2 = (60 - 58) ** 2 / 58 + (18 - 20) ** 2 / 20 + (22 - 22) ** 2 / 22
    assert check.dof == 2 and check.chi2 == pytest.approx(chi2, rel=1e-12)
    assert check.missing_mass == pytest.approx(0.02, abs=1e-15)
    assert check.expected_missing_mass == pytest.approx(2 * 0.01 * 0.99**100 + 2 * 0.2 * 0.8**100 + 0.58 * 0.42**100)
    assert np.isinf(check.z[-1]) and check.z[2] == pytest.approx(2 / math.sqrt(100 * 0.58 * 0.42))
    assert "Q = -1..3 seen (4)" in check.summary() and "missing mass 0.02" in check.summary()
    # uniform weights change nothing; zero weights remove draws
    same = sector_check(q, probs, weights=np.full(q.size, 3.0))
    assert same.chi2 == pytest.approx(check.chi2, rel=1e-12) and same.n_eff == pytest.approx(100)
    w = np.where(np.rint(q) == 0, 1.0, 0.0)
    only_zero = sector_check(q, probs, weights=w)
    assert only_zero.n_eff == pytest.approx(60) and only_zero.missing_mass == pytest.approx(0.42)
    with pytest.raises(ValueError):
        sector_check(np.array([]), probs)
    with pytest.raises(ValueError):
        sector_check(q, (np.array([0, 0]), np.array([0.5, 0.5])))


@pytest.mark.statistical
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sector_check_passes_exact_draws_and_flags_dropped_sectors(seed: int) -> None:
    """Exact draws at beta = 6, 16x16 pass (p > 1e-3, missing mass tiny); a 'flow' whose proposals are the
    same draws kept only at Q = 0 (or |Q| <= 1) fails clearly and shows the mass it never reaches."""
    beta, shape = 6.0, (16, 16)
    probs = exact_q_distribution(beta, shape)
    q_all, p_all = probs
    q = exact_charges(beta, shape, 4000, stat_seed(420 + seed))
    check = sector_check(q, probs)
    assert check.p_value > 1e-3, check.summary()
    assert check.missing_mass < 1e-3, check.summary()  # sectors |Q| >= 5 carry 2e-4 in all

    zero = sector_check(q[q == 0], probs)
    assert zero.p_value < 1e-12 and zero.dof >= 3, zero.summary()
    assert zero.missing_mass == pytest.approx(1 - p_all[q_all == 0][0], abs=1e-12)
    assert zero.missing_mass > 0.6
    low = sector_check(q[np.abs(q) <= 1], probs)
    assert low.p_value < 1e-12, low.summary()
    assert low.missing_mass == pytest.approx(float(p_all[np.abs(q_all) >= 2].sum()), abs=1e-12)
    assert low.missing_mass > 100 * low.expected_missing_mass


# --- free phi^4 log Z ----------------------------------------------------------------------------


def test_free_log_z_single_site_and_two_sites() -> None:
    """One site: ``S = m2 phi^2``; two sites (L = 2, d = 1): direct 2D quadrature of ``exp(-S)``."""
    for m2 in (0.5, 2.0):
        assert free_log_z((1,), m2) == pytest.approx(0.5 * math.log(math.pi / m2), rel=1e-14)
        assert free_log_z((1, 1), m2) == pytest.approx(0.5 * math.log(math.pi / m2), rel=1e-14)
        theory = Phi4Theory(Phi4Params(m2=m2, lam=0.0), Lattice((2,)))

        def action(a: float, b: float, m2: float = m2) -> float:
            return 2 * (a - b) ** 2 + m2 * (a * a + b * b)  # S at L = 2: both neighbours of a are b

        pts = torch.randn(5, 2, generator=gen(0), dtype=F64)
        expected = torch.tensor([action(float(a), float(b)) for a, b in pts], dtype=F64)
        torch.testing.assert_close(theory.action(pts), expected, rtol=1e-14, atol=0)
        z, _ = integrate.dblquad(lambda a, b: math.exp(-action(a, b)), -12, 12, -12, 12, epsabs=1e-13, epsrel=1e-11)
        assert theory.exact_log_z() == pytest.approx(math.log(z), abs=1e-8)


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (8, 8)])
def test_free_log_z_against_dense_determinant(shape: tuple[int, ...]) -> None:
    """``log Z = (V/2) log(2 pi) - (1/2) log det K`` with the Hessian ``K`` of the actual action."""
    m2 = 0.7
    theory = Phi4Theory(Phi4Params(m2=m2, lam=0.0), Lattice(shape))
    v = math.prod(shape)
    zero = torch.zeros(v, dtype=F64)
    hess = torch.autograd.functional.hessian(lambda x: theory.action(x.reshape(1, *shape))[0], zero)
    sign, logdet = torch.linalg.slogdet(hess)
    assert sign == 1
    expected = 0.5 * v * math.log(2 * math.pi) - 0.5 * float(logdet)
    assert free_log_z(shape, m2) == pytest.approx(expected, abs=1e-11)
    assert theory.exact_log_z() == pytest.approx(expected, abs=1e-11)
    # d log Z / d m2 = -<sum_x phi_x^2> = -V <phi^2>
    h = 1e-5
    deriv = (free_log_z(shape, m2 + h) - free_log_z(shape, m2 - h)) / (2 * h)
    assert deriv == pytest.approx(-v * free_phi2(shape, m2), rel=1e-8)


def test_phi4_log_z_methods() -> None:
    interacting = Phi4Theory(Phi4Params(m2=-4.0, lam=6.975), Lattice((6, 6)))
    assert interacting.exact_log_z() is None
    assert interacting.field_log_volume() == 0.0
    assert Phi4Theory(Phi4Params(m2=1.0, lam=0.0), Lattice((4, 4))).field_log_volume() == 0.0
    # docs/REFERENCES.md, phi^4 free field
    assert free_log_z((8, 8), 1.25) == pytest.approx(-13.57237614, abs=5e-9)
    assert free_log_z((14, 14), 1.0) == pytest.approx(-35.59876154, abs=5e-9)
