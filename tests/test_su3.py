"""SU(N) Wilson gauge theory (theories/su3.py): symmetries, cold start, clover charge normalisation,
character coefficients against direct Haar integration, exact 2D torus results against Monte Carlo."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import stat_seed

from latflow.lattice import Lattice
from latflow.rng import make_generator
from latflow.sun import expm_su, haar_sun, random_algebra, sun_gauge_transform
from theories.su3 import (
    SUNGaugeAction,
    SUNParams,
    exact_log_z,
    exact_plaquette,
    exact_plaquette_infinite,
    single_plaquette_coefficients,
    sun_partitions,
)

torch.set_num_threads(1)


def _theory(beta: float, n: int, shape: tuple[int, ...]) -> SUNGaugeAction:
    return SUNGaugeAction(SUNParams(beta, n), Lattice(shape))


def test_params_are_validated():
    with pytest.raises(ValueError):
        SUNParams(float("nan"))
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError):
            SUNParams(1.0, bad)
    assert SUNParams(2.0).n == 3
    with pytest.raises(ValueError):
        _theory(1.0, 3, (4,))


@pytest.mark.parametrize(("n", "shape"), [(2, (4, 3)), (3, (3, 4)), (3, (2, 3, 2, 2)), (2, (3, 2, 2, 2))])
def test_action_and_observables_are_gauge_invariant(n, shape):
    theory = _theory(1.7, n, shape)
    gen = make_generator(11, n, len(shape))
    u = haar_sun((2, len(shape), *shape), n, gen)
    omega = haar_sun((2, *shape), n, gen)
    v = sun_gauge_transform(u, omega)
    torch.testing.assert_close(theory.action(v), theory.action(u), rtol=0, atol=1e-11)
    obs_u, obs_v = theory.observables(u), theory.observables(v)
    assert set(obs_u) == set(theory.observable_descriptions())
    for name, val in obs_u.items():
        assert val.shape == (2,) and val.dtype == torch.float64, name
        torch.testing.assert_close(obs_v[name], val, rtol=0, atol=1e-11, msg=name)
    # non-trivial on a random configuration: the checks above have teeth
    assert obs_u["plaquette"].abs().max() < 0.5 and obs_u["wilson_loop_1x2"].abs().max() < 0.5
    torch.testing.assert_close(
        obs_u["action"], -1.7 * obs_u["plaquette"] * theory.lattice.volume * len(shape) * (len(shape) - 1) / 2
    )
    if len(shape) == 4:
        assert obs_u["topological_charge"].abs().min() > 1e-6
        assert set(theory.derived_observables()) == {"topological_susceptibility"}
        assert theory.exact_means() == {"polyakov_loop": 0.0, "topological_charge": 0.0}
        assert theory.exact_log_z() is None
    else:
        assert theory.exact_log_z() == exact_log_z(1.7, n, shape)


@pytest.mark.parametrize(("n", "shape"), [(2, (4, 4)), (3, (2, 3, 2, 2))])
def test_cold_start(n, shape):
    theory = _theory(2.5, n, shape)
    d = len(shape)
    u = torch.eye(n, dtype=torch.complex128).expand(1, d, *shape, n, n).clone()
    obs = theory.observables(u)
    n_plaq = theory.lattice.volume * d * (d - 1) // 2
    assert obs["action"].item() == pytest.approx(-2.5 * n_plaq, abs=1e-12)
    for name in ("plaquette", "wilson_loop_1x1", "wilson_loop_1x2", "wilson_loop_2x2", "polyakov_loop"):
        assert obs[name].item() == pytest.approx(1.0, abs=1e-14), name
    assert obs["polyakov_loop_abs"].item() == pytest.approx(1.0, abs=1e-14)
    if d == 4:
        assert obs["topological_charge"].item() == 0.0
    # center transformation of one time slice: Re tr L / N -> Re(z) with z = e^{2 pi i / N}, plaquettes unchanged
    z = torch.tensor(complex(math.cos(2 * math.pi / n), math.sin(2 * math.pi / n)), dtype=torch.complex128)
    v = u.clone()
    v[:, 0, 1] = v[:, 0, 1] * z
    obs_v = theory.observables(v)
    assert obs_v["polyakov_loop"].item() == pytest.approx(math.cos(2 * math.pi / n), abs=1e-14)
    assert obs_v["plaquette"].item() == pytest.approx(1.0, abs=1e-14)


def _constant_flux_links(n: int, shape: tuple[int, int, int, int], n01: int, n23: int) -> torch.Tensor:
    """Abelian constant-field links in ``diag(e^{i phi}, e^{-i phi}, 1, ...)``, fluxes ``n01``, ``n23``: every
    plaquette of the planes (0, 1) and (2, 3) has the phase ``2 pi n / (L_mu L_nu)``, the others 1."""
    l0, l1, l2, l3 = shape
    x = [torch.arange(s, dtype=torch.float64) for s in shape]
    grid = torch.meshgrid(*x, indexing="ij")
    phi = torch.zeros(4, *shape, dtype=torch.float64)
    phi[1] = 2 * math.pi * n01 * grid[0] / (l0 * l1)
    phi[0] = torch.where(grid[0] == l0 - 1, -2 * math.pi * n01 * grid[1] / l1, 0.0)
    phi[3] = 2 * math.pi * n23 * grid[2] / (l2 * l3)
    phi[2] = torch.where(grid[2] == l2 - 1, -2 * math.pi * n23 * grid[3] / l3, 0.0)
    diag = torch.ones(4, *shape, n, dtype=torch.complex128)
    diag[..., 0] = torch.exp(1j * phi)
    diag[..., 1] = torch.exp(-1j * phi)
    return torch.diag_embed(diag).unsqueeze(0)


@pytest.mark.parametrize("n", [2, 3])
def test_clover_charge_of_constant_abelian_flux(n):
    """Uniform plaquette phases f01, f23 give F_01 = sin(f01) diag(1, -1, 0..), so exactly
    Q = 2 V sin(f01) sin(f23) / (4 pi^2), which tends to the continuum 2 n01 n23 as f -> 0."""
    shape = (4, 4, 6, 6)
    theory = _theory(1.0, n, shape)
    gen = make_generator(12, n)
    for n01, n23 in ((1, 1), (1, -2), (0, 3)):
        u = _constant_flux_links(n, shape, n01, n23)
        f01, f23 = 2 * math.pi * n01 / 16, 2 * math.pi * n23 / 36
        expected = 2 * theory.lattice.volume * math.sin(f01) * math.sin(f23) / (4 * math.pi**2)
        q = theory.observables(u)["topological_charge"].item()
        assert q == pytest.approx(expected, abs=1e-10)
        assert q == pytest.approx(2 * n01 * n23, abs=0.05 * abs(2 * n01 * n23) + 1e-10)
        v = sun_gauge_transform(u, haar_sun(shape, n, gen).unsqueeze(0))
        assert theory.observables(v)["topological_charge"].item() == pytest.approx(expected, abs=1e-10)


def test_clover_charge_vanishes_near_the_identity():
    """Q of links exp(eps A) is at least quadratic in eps (and exactly 0 at eps = 0)."""
    shape = (2, 3, 2, 3)
    theory = _theory(1.0, 3, shape)
    a = random_algebra((1, 4, *shape), 3, make_generator(13))
    q = [theory.observables(expm_su(eps * a))["topological_charge"].item() for eps in (1e-2, 5e-3)]
    assert abs(q[0]) < 1e-3
    assert abs(q[1]) < abs(q[0]) / 3.5


# --- character coefficients against direct integration over the group ---------------------------


def _su2_coefficients_by_quadrature(beta: float, n_irreps: int) -> np.ndarray:
    """``b_j`` for the spin ``j = k/2`` irreps of SU(2): ``(1/d) int (2/pi) sin^2 t chi_k(t) e^{beta cos t} dt``
    over ``t in [0, pi]`` (eigenvalues ``e^{+-it}``, ``chi_k = sin((k+1) t) / sin t``), Gauss-Legendre."""
    x, w = np.polynomial.legendre.leggauss(200)
    t, w = 0.5 * math.pi * (x + 1), 0.5 * math.pi * w
    k = np.arange(n_irreps)[:, None]
    integrand = (2 / math.pi) * np.sin(t) * np.sin((k + 1) * t) * np.exp(beta * np.cos(t))
    return (integrand @ w) / (k[:, 0] + 1)


def _su3_coefficients_by_quadrature(beta: float, partitions: np.ndarray, dims: np.ndarray) -> np.ndarray:
    """``b_lambda`` of SU(3) by the Weyl integration formula
    ``int dU g = (1/3!) int dt1 dt2 / (2 pi)^2 |Delta|^2 g`` over the eigenphases ``(t1, t2, -t1-t2)``, with
    ``chi_lambda^* |Delta|^2 = Delta conj(det[z_i^{lambda_j + 3 - j}])`` (``Delta = det[z_i^{3-j}]``), by the
    periodic trapezoid rule (exponentially convergent for this entire periodic integrand)."""
    m = 96
    t = 2 * math.pi * np.arange(m) / m
    t1, t2 = np.meshgrid(t, t, indexing="ij")
    z = np.exp(1j * np.stack([t1, t2, -t1 - t2], axis=-1))  # [m, m, 3]
    weight = np.exp((beta / 3) * z.real.sum(-1))

    def alternant(lam: np.ndarray) -> np.ndarray:
        powers = lam + 2 - np.arange(3)  # lambda_j + N - j, j = 1..N
        return np.linalg.det(z[..., :, None] ** powers[None, None, None, :])

    delta = alternant(np.zeros(3, dtype=np.int64))
    out = [np.mean(delta * np.conj(alternant(lam)) * weight).real / 6 for lam in partitions]
    return np.array(out) / dims


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 4.0, 8.0])
def test_su2_character_coefficients_against_integration(beta):
    lam, dims, b = single_plaquette_coefficients(beta, 2)
    assert lam[:, 1].max() == 0 and list(lam[:6, 0]) == list(range(6))
    np.testing.assert_array_equal(dims[:6], np.arange(1, 7))
    ref = _su2_coefficients_by_quadrature(beta, 12)
    np.testing.assert_allclose(b[:12], ref, rtol=0, atol=1e-10 * ref[0])
    # SU(2): b_0 = 2 I_1(beta)/beta and the single-plaquette <Re tr U / 2> = I_2(beta) / I_1(beta)
    from scipy.special import iv

    assert b[0] == pytest.approx(2 * iv(1, beta) / beta, rel=1e-12)
    assert exact_plaquette_infinite(beta, 2) == pytest.approx(iv(2, beta) / iv(1, beta), rel=1e-12)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 4.0, 8.0])
def test_su3_character_coefficients_against_integration(beta):
    lam, dims, b = single_plaquette_coefficients(beta, 3)
    # Dynkin labels (p, q) = (lambda_1 - lambda_2, lambda_2): d = (p+1)(q+1)(p+q+2)/2
    p, q = lam[:, 0] - lam[:, 1], lam[:, 1]
    np.testing.assert_array_equal(dims, (p + 1) * (q + 1) * (p + q + 2) / 2)
    sel = sun_partitions(3, 4)
    idx = [int(np.flatnonzero((lam == row).all(axis=1))[0]) for row in sel]
    ref = _su3_coefficients_by_quadrature(beta, sel, dims[idx])
    np.testing.assert_allclose(b[idx], ref, rtol=0, atol=1e-10 * ref[0])
    # complex conjugate irreps (p, q) and (q, p) have equal coefficients: Re tr U is real
    for row in sel:
        conj = np.array([row[0], row[0] - row[1], 0])
        j = int(np.flatnonzero((lam == conj).all(axis=1))[0])
        assert b[j] == pytest.approx(b[int(np.flatnonzero((lam == row).all(axis=1))[0])], rel=1e-12)


def test_single_plaquette_expectation_by_quadrature():
    """b_0'/b_0 = <Re tr U / N> under e^{(beta/N) Re tr U} dU, the latter by direct SU(3) integration."""
    m = 96
    t = 2 * math.pi * np.arange(m) / m
    t1, t2 = np.meshgrid(t, t, indexing="ij")
    z = np.exp(1j * np.stack([t1, t2, -t1 - t2], axis=-1))
    vdm = np.prod([np.abs(z[..., i] - z[..., j]) ** 2 for i, j in itertools.combinations(range(3), 2)], axis=0)
    re_tr = z.real.sum(-1) / 3
    for beta in (1.0, 3.0, 6.0):
        w = vdm * np.exp(beta * re_tr)
        assert exact_plaquette_infinite(beta, 3) == pytest.approx(np.sum(w * re_tr) / np.sum(w), abs=1e-12)


# --- exact 2D torus results --------------------------------------------------------------------


def test_exact_torus_values_and_limits():
    # values in docs/REFERENCES.md
    assert exact_plaquette_infinite(1.0, 3) == pytest.approx(0.0601265548, abs=1e-10)
    assert exact_plaquette(6.0, 3, (4, 4)) == pytest.approx(0.42253206, abs=1e-8)
    assert exact_plaquette_infinite(2.0, 2) == pytest.approx(0.4331274267, abs=1e-10)
    for n, beta in ((2, 2.0), (3, 4.0), (3, 8.0)):
        inf = exact_plaquette_infinite(beta, n)
        gaps = [abs(exact_plaquette(beta, n, (L, L)) - inf) for L in (1, 2, 3, 4, 6)]
        assert all(b < a for a, b in zip(gaps, gaps[1:], strict=False) if a > 1e-15), gaps
        assert gaps[0] > 1e-3 and abs(exact_plaquette(beta, n, (16, 16)) - inf) < 1e-12
        # d log Z / d beta = P <plaquette>, by a central difference
        shape, h = (2, 3), 1e-4
        deriv = (exact_log_z(beta + h, n, shape) - exact_log_z(beta - h, n, shape)) / (2 * h)
        assert deriv / 6 == pytest.approx(exact_plaquette(beta, n, shape), abs=1e-7)
    # beta = 0: Haar measure, log Z = 0 and plaquette 0, except on the single-plaquette torus 1 x 1, where
    # P = U V U^-1 V^-1 and int dU U V U^-1 = tr(V) / N give <Re tr P / N> = <|tr V|^2> / N^2 = 1 / N^2
    assert exact_log_z(0.0, 3, (4, 4)) == pytest.approx(0.0, abs=1e-14)
    assert exact_plaquette(0.0, 3, (4, 4)) == pytest.approx(0.0, abs=1e-14)
    with pytest.raises(ValueError):
        exact_plaquette(1.0, 3, (2, 2, 2))
    for n in (2, 3, 4):
        assert exact_plaquette(0.0, n, (1, 1)) == pytest.approx(1 / n**2, abs=1e-14)


@pytest.mark.statistical
@pytest.mark.parametrize(
    ("n", "beta", "shape", "base", "resolved"),
    [(2, 1.0, (2, 2), 41, False), (3, 2.0, (2, 2), 42, False), (2, 2.0, (1, 2), 43, True), (3, 3.0, (1, 2), 44, True)],
)
def test_exact_torus_plaquette_and_log_z_against_haar_importance_sampling(n, beta, shape, base, resolved, record_z):
    """Haar-random links weighted by e^{-S}: Z = <e^{-S}>_Haar and <plaquette> = <e^{-S} plaq> / <e^{-S}>.
    On the 1 x 2 tori the estimate also resolves the finite-volume plaquette from the infinite-volume one."""
    theory = _theory(beta, n, shape)
    gen = make_generator(stat_seed(base))
    m = 100_000 if n == 2 else 40_000
    u = haar_sun((m, 2, *shape), n, gen)
    obs = theory.observables(u)
    s, plaq = obs["action"].numpy(), obs["plaquette"].numpy()
    w = np.exp(-s)
    z_hat, z_err = w.mean(), w.std(ddof=1) / math.sqrt(m)
    z_exact = math.exp(exact_log_z(beta, n, shape))
    z_score = (z_hat - z_exact) / z_err
    record_z("Z", z_score)
    assert abs(z_score) < 3
    p_hat = np.sum(w * plaq) / np.sum(w)
    p_err = math.sqrt(np.sum((w * (plaq - p_hat)) ** 2)) / np.sum(w)  # delta method for the ratio
    p_exact = exact_plaquette(beta, n, shape)
    z_score = (p_hat - p_exact) / p_err
    record_z("plaquette", z_score)
    assert abs(z_score) < 3
    if resolved:
        assert abs(p_hat - exact_plaquette_infinite(beta, n)) > 5 * p_err
