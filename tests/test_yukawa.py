"""Yukawa theory (theories/yukawa.py): a real scalar with two staggered fermions integrated out.

- normalisation: the nearest-neighbour form of S_B equals phi^4's action configuration by configuration
  (2D and 3D), and the hopping form maps onto S_B(sqrt(kappa) h) + lam_hat V with y h = g phi;
- g = 0 is phi^4: the effective action differs by the free log det(D^dag D) (closed form), the scalar
  observables agree bit for bit, log Z of the free theory is phi^4's plus the free fermion log det;
- forces: the exact effective force is the autograd gradient of the effective action;
- condensate: (1/V) Tr D^-1 is real, odd under phi -> -phi at m_f = 0, and its Z2-noise estimate is
  unbiased (z-test with many noise vectors on one configuration); the noise is a function of the configuration;
- correlators: sum_t C(t) = chi2; the fermion correlator against the dense inverse, free at g = 0;
- exactness on a 2x2 lattice: quadrature over the four scalar variables (Gauss-Legendre in the zero mode,
  split at M = 0 where |M| has its kink, trapezoid in the three staggered modes) against HMC on the exact
  effective action; the g = 0 values lie many sigma away (the fermions matter at this point);
- bad input: couplings, odd time extent, dense observables above dense_max_volume, a misspelt coupling in a job.

Statistical tests take their seeds from ``stat_seed`` (``--seed-offset``). Run with ``-s`` to see the z-scores.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import stat_seed

from latflow.analysis import GammaResult, gamma_method
from latflow.fermions.staggered import free_logdet_normal, free_normal_spectrum
from latflow.lattice import Lattice
from latflow.rng import make_generator
from latflow.samplers import HMC
from latflow.theories.phi4 import Phi4Params, Phi4Theory, free_chi2, free_log_z, free_phi2
from latflow.theories.yukawa import YukawaParams, YukawaTheory, from_hopping_form, nearest_neighbour_action

F64 = torch.float64
SCALAR_OBS = ("magnetization", "abs_magnetization", "chi2", "ising_energy", "phi2")


def yukawa(m2: float, lam: float, g: float, m_f: float, shape: tuple[int, ...], **kw) -> YukawaTheory:
    return YukawaTheory(YukawaParams(m2, lam, g, m_f), Lattice(shape), **kw)


def random_phi(shape: tuple[int, ...], n: int, seed: int, scale: float = 0.7) -> torch.Tensor:
    """``[n, *shape]`` float64 Gaussian field of width ``scale``."""
    return scale * torch.randn((n, *shape), generator=make_generator(seed), dtype=F64)


# --- 1. normalisation -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 6), (2, 4, 4)], ids=["4x6", "2x4x4"])
def test_nearest_neighbour_action_is_phi4_action(shape):
    m2, lam = -1.3, 0.8
    theory = yukawa(m2, lam, 0.4, 0.0, shape)
    phi4 = Phi4Theory(Phi4Params(m2, lam), Lattice(shape))
    phi = random_phi(shape, 5, 11)
    s_nn = nearest_neighbour_action(phi, m2, lam)
    assert s_nn.shape == (5,)
    torch.testing.assert_close(s_nn, phi4.action(phi), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(theory.scalar_action(phi), phi4.action(phi), rtol=0, atol=0)
    torch.testing.assert_close(theory.gauge_action(phi), phi4.action(phi), rtol=0, atol=0)


def hopping_action(h: torch.Tensor, kappa: float, lam_hat: float) -> torch.Tensor:
    """``S_hop = sum_x [ -2 kappa sum_mu h_x h_{x+mu} + h_x^2 + lam_hat (h_x^2 - 1)^2 ]`` ``[B]`` (periodic)."""
    d = h.dim() - 1
    hop = sum(h * torch.roll(h, -1, 1 + mu) for mu in range(d))
    return (-2.0 * kappa * hop + h * h + lam_hat * (h * h - 1.0) ** 2).flatten(1).sum(1)


@pytest.mark.parametrize(
    "kappa, lam_hat, y, shape",
    [(0.12, 0.02, 0.3, (4, 4)), (0.26, 1.1, 0.05, (6, 4)), (0.3, 0.5, 1.2, (2, 4, 4)), (0.05, 0.0, 0.2, (4, 4))],
)
def test_from_hopping_form(kappa, lam_hat, y, shape):
    d = len(shape)
    params, scale = from_hopping_form(kappa, lam_hat, y, d=d)
    assert scale == pytest.approx(math.sqrt(kappa), rel=1e-15)
    h = random_phi(shape, 4, 12, scale=1.3)
    phi = scale * h
    v = math.prod(shape)
    s_b = nearest_neighbour_action(phi, params.m2, params.lam)
    torch.testing.assert_close(hopping_action(h, kappa, lam_hat), s_b + lam_hat * v, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(y * h, params.g * phi, rtol=1e-13, atol=1e-14)  # the Yukawa term, site by site
    theory = YukawaTheory(params, Lattice(shape))
    torch.testing.assert_close(theory.scalar_action(phi), s_b, rtol=1e-12, atol=1e-10)
    with pytest.raises(ValueError, match="kappa"):
        from_hopping_form(0.0, lam_hat, y, d=d)


# --- 2. g = 0 is phi^4 -------------------------------------------------------------------------------


@pytest.mark.parametrize("m_f", [0.0, 0.35])
@pytest.mark.parametrize("shape", [(4, 6), (2, 2, 4)], ids=["4x6", "2x2x4"])
def test_zero_yukawa_is_phi4(shape, m_f):
    m2, lam = -1.0, 0.7
    theory = yukawa(m2, lam, 0.0, m_f, shape)
    phi4 = Phi4Theory(Phi4Params(m2, lam), Lattice(shape))
    phi = random_phi(shape, 6, 21)
    free = free_logdet_normal(shape, m_f)
    diff = theory.action(phi) - phi4.action(phi)
    torch.testing.assert_close(diff, torch.full_like(diff, -free), rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(theory.fermion_logdet(phi), torch.full_like(diff, free), rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(theory.force(phi), phi4.force(phi), rtol=0, atol=1e-13)
    obs, ref = theory.observables(phi), phi4.observables(phi)
    for name in SCALAR_OBS:
        assert torch.equal(obs[name], ref[name]), name
    assert torch.equal(obs["scalar_action"], ref["action"])
    # a field-independent condensate: (1/V) Tr (D_st + m_f)^-1 = m_f <1 / (m_f^2 + sum sin^2 p)>
    spectrum = free_normal_spectrum(shape, m_f)
    torch.testing.assert_close(
        obs["condensate"], torch.full_like(diff, float(m_f * np.mean(1.0 / spectrum))), rtol=1e-11, atol=1e-13
    )


def test_exact_log_z_of_the_free_theory():
    shape, m2, m_f = (4, 6), 0.7, 0.4
    theory = yukawa(m2, 0.0, 0.0, m_f, shape)
    expected = free_log_z(shape, m2) + free_logdet_normal(shape, m_f)
    assert theory.exact_log_z() == pytest.approx(expected, rel=1e-14)
    assert theory.exact_log_z() == pytest.approx(
        Phi4Theory(Phi4Params(m2, 0.0), Lattice(shape)).exact_log_z() + free_logdet_normal(shape, m_f), rel=1e-14
    )
    # the closed-form fermion log det against the dense LU
    dense = theory.fermion_logdet(torch.zeros((1, *shape), dtype=F64))
    assert dense.item() == pytest.approx(free_logdet_normal(shape, m_f), rel=1e-12)
    # draws: those of the free scalar, bit for bit
    phi4 = Phi4Theory(Phi4Params(m2, 0.0), Lattice(shape))
    assert torch.equal(theory.sample_exact(7, make_generator(3)), phi4.sample_exact(7, make_generator(3)))
    for other in (yukawa(m2, 0.5, 0.0, m_f, shape), yukawa(m2, 0.0, 0.1, m_f, shape)):
        assert other.exact_log_z() is None
        assert other.sample_exact(2, make_generator(3)) is None


# --- 3. forces ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("m_f", [0.0, 0.25])
@pytest.mark.parametrize("shape", [(4, 4), (2, 6), (2, 2, 4)], ids=["4x4", "2x6", "2x2x4"])
def test_force_is_autograd_of_action(shape, m_f):
    theory = yukawa(-1.2, 0.9, 0.8, m_f, shape)
    phi = random_phi(shape, 3, 31).requires_grad_(True)
    (grad,) = torch.autograd.grad(theory.action(phi).sum(), phi)
    force = theory.force(phi.detach())
    assert force.shape == phi.shape and force.dtype == F64
    torch.testing.assert_close(force, grad, rtol=1e-10, atol=1e-11)
    # the fermions contribute (g != 0): the force is not phi^4's
    phi4 = Phi4Theory(Phi4Params(-1.2, 0.9), Lattice(shape))
    assert (force - phi4.force(phi.detach())).abs().max() > 1e-2
    # gauge_force: phi^4's analytic force and the gradient of the bosonic action
    torch.testing.assert_close(theory.gauge_force(phi.detach()), phi4.force(phi.detach()), rtol=0, atol=0)
    (grad_b,) = torch.autograd.grad(theory.gauge_action(phi).sum(), phi)
    torch.testing.assert_close(theory.gauge_force(phi.detach()), grad_b, rtol=1e-12, atol=1e-12)


# --- 4. condensate -----------------------------------------------------------------------------------


def complex_dense(theory: YukawaTheory, phi: torch.Tensor) -> torch.Tensor:
    """``D`` ``[B, V, V]`` complex, column j = ``apply(phi, e_j)`` (the operator itself, not ``dense``)."""
    v = theory.lattice.volume
    eye = torch.eye(v, dtype=torch.complex128).reshape(v, *theory.field_shape)
    mats = [theory.dirac.apply(p.expand(v, *p.shape), eye).reshape(v, v).T for p in phi]
    return torch.stack(mats)


@pytest.mark.parametrize("m_f", [0.0, 0.3])
def test_condensate_is_real_and_the_trace_of_the_inverse(m_f):
    shape = (4, 6)
    theory = yukawa(-1.0, 0.7, 0.9, m_f, shape)
    phi = random_phi(shape, 4, 41)
    sigma = theory.condensate(phi)
    assert sigma.shape == (4,) and not sigma.is_complex()
    trace = torch.linalg.inv(complex_dense(theory, phi)).diagonal(dim1=-2, dim2=-1).sum(-1) / theory.lattice.volume
    assert trace.imag.abs().max() < 1e-13
    torch.testing.assert_close(sigma, trace.real, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(theory.observables(phi)["condensate"], sigma, rtol=1e-12, atol=1e-14)


def test_condensate_is_odd_under_phi_to_minus_phi_at_zero_mass():
    shape = (4, 6)
    phi = random_phi(shape, 4, 42)
    theory = yukawa(-1.0, 0.7, 0.9, 0.0, shape)
    sigma = theory.condensate(phi)
    assert sigma.abs().min() > 1e-3  # not trivially zero
    torch.testing.assert_close(theory.condensate(-phi), -sigma, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(theory.action(-phi), theory.action(phi), rtol=1e-12, atol=1e-11)
    obs, obs_neg = theory.observables(phi), theory.observables(-phi)
    torch.testing.assert_close(obs_neg["condensate_sign"], obs["condensate_sign"], rtol=1e-11, atol=1e-13)
    assert theory.exact_means() == {"magnetization": 0.0, "condensate": 0.0}
    # a fermion mass breaks the symmetry: no exact means, the condensate is not odd
    massive = yukawa(-1.0, 0.7, 0.9, 0.3, shape)
    assert massive.exact_means() == {}
    assert (massive.condensate(-phi) + massive.condensate(phi)).abs().max() > 1e-3


def test_configuration_noise_is_a_function_of_the_configuration():
    shape = (4, 4)
    theory = yukawa(-1.0, 0.7, 0.5, 0.0, shape)
    phi = random_phi(shape, 3, 43)
    eta = theory.configuration_noise(phi, 5)
    assert eta.shape == (15, *shape) and eta.dtype == torch.complex128
    assert torch.equal(eta.real.abs(), torch.ones_like(eta.real)) and torch.equal(eta.imag, torch.zeros_like(eta.real))
    assert torch.equal(theory.configuration_noise(phi, 5), eta)
    # the same configuration elsewhere in a batch gets the same noise; another configuration other noise
    swapped = theory.configuration_noise(phi[[2, 0]], 5)
    assert torch.equal(swapped[:5], eta[10:]) and torch.equal(swapped[5:], eta[:5])
    assert not torch.equal(eta[:5], eta[5:10])
    assert theory.configuration_noise(phi[:0], 5).shape == (0, *shape)
    # above dense_max_volume the condensate is that noise's estimate: the same for the same configuration
    stochastic = yukawa(-1.0, 0.7, 0.5, 0.0, shape, dense_max_volume=8, n_noise=6)
    first = stochastic.observables(phi)["condensate"]
    assert torch.equal(stochastic.observables(phi[[1, 2, 0]])["condensate"], first[[1, 2, 0]])
    assert "fermion_logdet" not in stochastic.observables(phi)
    torch.testing.assert_close(
        first, stochastic.condensate_stochastic(phi, stochastic.configuration_noise(phi, 6)), rtol=0, atol=0
    )


@pytest.mark.statistical
@pytest.mark.parametrize("m_f", [0.0, 0.2])
def test_stochastic_condensate_is_unbiased(m_f, record_z):
    """4000 Z2 vectors on one 4x6 configuration, one estimate each, against the exact trace."""
    shape, n = (4, 6), 4000
    theory = yukawa(-1.0, 0.7, 0.9, m_f, shape)
    phi = 0.6 + random_phi(shape, 1, 44, scale=0.3)  # ordered: a condensate well away from 0
    exact = theory.condensate(phi).item()
    g = make_generator(stat_seed(45 if m_f == 0 else 46))
    eta = (2 * torch.randint(0, 2, (n, *shape), generator=g) - 1).to(torch.complex128)
    per = theory.condensate_stochastic(phi.expand(n, *shape), eta, tol=1e-12).numpy()  # one vector per row
    mean, err = per.mean(), per.std(ddof=1) / math.sqrt(n)
    z = (mean - exact) / err
    print(f"condensate m_f={m_f}: exact {exact:.6f}, Z2 {mean:.6f} +- {err:.6f}, z = {z:+.2f}")
    record_z("condensate", z)
    assert abs(z) < 3
    assert err < 0.005 * abs(exact)  # the resolution that makes 3 sigma mean something
    # the mean of the estimates over n vectors in one call is the same estimator
    assert theory.condensate_stochastic(phi, eta[:10], tol=1e-12).item() == pytest.approx(per[:10].mean(), rel=1e-9)


# --- 5. correlators ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 6), (6, 2, 4), (8,)], ids=["4x6", "6x2x4", "8"])
def test_scalar_correlator_sums_to_chi2(shape):
    theory = yukawa(-1.0, 0.7, 0.9, 0.0, shape)
    phi = random_phi(shape, 5, 51) + 0.3
    corr = theory.scalar_correlator(phi)
    assert corr.shape == (5, shape[0])
    torch.testing.assert_close(corr.sum(1), theory.observables(phi)["chi2"], rtol=1e-12, atol=1e-12)
    big = phi.reshape(5, shape[0], -1).sum(-1)  # Phi(t)
    direct = torch.stack([(big * torch.roll(big, -t, 1)).sum(1) for t in range(shape[0])], 1) / math.prod(shape)
    torch.testing.assert_close(corr, direct, rtol=1e-12, atol=1e-12)


def dense_fermion_correlator(dinv: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``sum_x |D^-1(t, x; 0)|^2`` ``[B, L0]`` from the dense inverse ``[B, V, V]`` (source column 0)."""
    col = dinv[:, :, 0].reshape(dinv.shape[0], shape[0], -1)
    return (col.abs() ** 2).sum(-1)


@pytest.mark.parametrize("m_f", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(4, 6), (6, 2, 4), (8,)], ids=["4x6", "6x2x4", "8"])
def test_fermion_correlator_against_the_dense_inverse(shape, m_f):
    theory = yukawa(-1.0, 0.7, 0.9, m_f, shape)
    phi = random_phi(shape, 3, 52)
    expected = dense_fermion_correlator(torch.linalg.inv(theory.dirac.dense(phi)), shape)
    corr = theory.fermion_correlator(phi)
    assert corr.shape == (3, shape[0]) and corr.dtype == F64
    torch.testing.assert_close(corr, expected, rtol=1e-8, atol=1e-12)


def test_fermion_correlator_at_zero_yukawa_is_free():
    shape, m_f = (8, 4), 0.4
    theory = yukawa(-1.0, 0.7, 0.0, m_f, shape)
    v = theory.lattice.volume
    free = torch.linalg.inv(theory.dirac.free_dense() + m_f * torch.eye(v, dtype=F64)).unsqueeze(0)
    expected = dense_fermion_correlator(free, shape)[0]
    corr = theory.fermion_correlator(random_phi(shape, 4, 53))
    torch.testing.assert_close(corr, expected.expand(4, -1), rtol=1e-8, atol=1e-12)
    # free massive fermions decay: C_f(t) falls from t = 0 to the middle of the lattice and is symmetric
    assert expected[shape[0] // 2] < 0.1 * expected[0]
    torch.testing.assert_close(expected[1:], expected[1:].flip(0), rtol=1e-10, atol=1e-14)


# --- 6. exactness on a 2x2 lattice: quadrature against HMC --------------------------------------------

QUAD_SHAPE = (2, 2)
QUAD_POINT = (-1.0, 1.0, 1.0)  # (m2, lam, g), m_f = 0
QUAD_OBS = ("phi2", "abs_magnetization", "condensate_sign")
# orthonormal modes of the 2x2 lattice: a_0 = sum_x phi_x / 2 (so M = a_0 / 2), three staggered modes
HADAMARD = 0.5 * torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=F64)


@functools.lru_cache(maxsize=8)
def quadrature_means(
    m2: float, lam: float, g: float, *, n0: int = 32, r0: float = 4.0, n: int = 31, r: float = 3.0
) -> dict[str, float]:
    """``<O> = int dphi O exp(-S_B + log det(D^dag D)) / int dphi exp(...)`` over the 4 scalar variables.

    Coordinates ``a = H^T phi`` (orthogonal, unit Jacobian). ``a_0`` by Gauss-Legendre on ``[-r0, 0]`` and
    ``[0, r0]`` (``n0`` nodes each: ``|M|`` and ``sign(M)`` have their kink at ``a_0 = 0``), the staggered
    modes by the trapezoid rule on ``[-r, r]`` (``n`` nodes; exponentially accurate for a smooth, decaying
    integrand once the spacing is well below the narrowest mode's width). At (-1, 1, 1) the defaults agree
    with ``(n0, r0, n, r) = (40, 5, 45, 4.4)`` to 1e-8; a spacing of 0.25 instead of 0.2 is off by 2e-6. The
    determinant is ``theory.dirac.dense`` of every node, vectorised.
    """
    theory = yukawa(m2, lam, g, 0.0, QUAD_SHAPE)
    t, w = np.polynomial.legendre.leggauss(n0)
    x0 = torch.tensor(np.concatenate([r0 / 2 * (t - 1), r0 / 2 * (t + 1)]))
    w0 = torch.tensor(np.concatenate([r0 / 2 * w, r0 / 2 * w]))
    x = torch.linspace(-r, r, n, dtype=F64)
    a = torch.stack(torch.meshgrid(x0, x, x, x, indexing="ij"), -1).reshape(-1, 4)
    weight = w0[:, None].expand(-1, n**3).reshape(-1)  # the trapezoid's equal weights cancel in the ratio
    phi = (a @ HADAMARD.T).reshape(-1, *QUAD_SHAPE)
    log_w, values = [], []
    for chunk in phi.split(100_000):
        dense = theory.dirac.dense(chunk)
        _, logabs = torch.linalg.slogdet(dense)
        sigma = torch.linalg.inv(dense).diagonal(dim1=-2, dim2=-1).sum(-1) / theory.lattice.volume
        m = chunk.flatten(1).mean(1)
        log_w.append(-theory.scalar_action(chunk) + 2.0 * logabs)
        values.append(torch.stack([(chunk * chunk).flatten(1).mean(1), m.abs(), sigma * torch.sign(m)], 1))
    lw = torch.cat(log_w)
    p = weight * torch.exp(lw - lw.max())
    means = (p[:, None] * torch.cat(values)).sum(0) / p.sum()
    return dict(zip(QUAD_OBS, means.tolist(), strict=True))


def test_quadrature_is_converged_and_symmetric():
    m2, lam, g = QUAD_POINT
    other, used = quadrature_means(m2, lam, g, n0=24, r0=3.6, n=37, r=3.0), quadrature_means(m2, lam, g)
    for k in QUAD_OBS:
        assert other[k] == pytest.approx(used[k], abs=1e-8), k
    # the free scalar (lam = 0, g = 0): Gaussian, <phi^2> = G(0) and <|M|> = sqrt(2 var(M) / pi), var(M) = chi_2 / V
    free = quadrature_means(2.0, 0.0, 0.0, n0=24, n=25)  # spacing 0.25: 1e-7 here, 1e-11 at the default 0.2
    assert free["phi2"] == pytest.approx(free_phi2(QUAD_SHAPE, 2.0), rel=1e-6)
    assert free["abs_magnetization"] == pytest.approx(math.sqrt(2 * free_chi2(QUAD_SHAPE, 2.0) / 4 / math.pi), rel=1e-6)
    # at g = 0 the condensate of massless free fermions vanishes identically
    assert quadrature_means(m2, lam, 0.0, n0=16, n=21)["condensate_sign"] == pytest.approx(0.0, abs=1e-14)


def gamma_over_chains(values: np.ndarray, chain: np.ndarray, step: np.ndarray) -> GammaResult:
    reps = []
    for c in np.unique(chain):
        sel = np.flatnonzero(chain == c)
        reps.append(values[sel[np.argsort(step[sel], kind="stable")]])
    return gamma_method(reps)


@pytest.mark.statistical
def test_hmc_on_the_exact_effective_action_reproduces_quadrature(record_z):
    """64 chains x 1000 Omelyan trajectories (after 100) with the exact force at (m2, lam, g) = (-1, 1, 1).

    Trajectory length 0.6 (4 steps of 0.15 +- 30%): the autocorrelations of all three observables then decay
    monotonically (tau_int 1.2-1.9) and the Gamma method's automatic window matches a fixed window of 30. At
    length 0.8, phi2 was anticorrelated at lag 1 and correlated at lag 2, the window closed at lag 1, and its
    error came out 12% small (z-scores of -2.7 and +2.8 in 16 seed offsets).
    """
    m2, lam, g = QUAD_POINT
    theory = yukawa(m2, lam, g, 0.0, QUAD_SHAPE)
    exact = quadrature_means(m2, lam, g)
    exact_g0 = quadrature_means(m2, lam, 0.0, n0=24, n=25)  # 1e-5 is plenty for the contrast
    seed = stat_seed(61)
    # Starts with |g phi_x| < 1, the smallest singular value of D_st on this lattice (D_st is orthogonal here):
    # det D > 0 on the whole segment from phi = 0, so every chain starts in the region that carries the weight.
    # The pockets with det D < 0 hold 3e-9 of it, but HMC leaves one only through a det D = 0 wall: from
    # 0.5 randn starts (0.6% of them in a pocket) a chain stayed stuck for 700 trajectories (2 offsets in 16).
    x0 = 0.8 * (2 * torch.rand((64, *QUAD_SHAPE), generator=make_generator(seed, 1), dtype=F64) - 1)
    assert (theory.dirac.sign_det(x0) > 0).all()
    hmc = HMC(
        theory.action,
        x0,
        step_size=0.15,
        n_steps=4,
        generator=make_generator(seed),
        integrator="omelyan",
        step_jitter=0.3,
        force=theory.force,
    )
    hmc.run(100)
    rows = hmc.run(1000)
    acc = rows.accepted.double().mean().item()
    assert 0.8 < acc < 1.0, acc
    assert (theory.dirac.sign_det(rows.x) > 0).all()  # no chain in a pocket
    obs = theory.observables(rows.x)
    chain, step = rows.chain.numpy(), rows.step.numpy()
    for k in QUAD_OBS:
        res = gamma_over_chains(obs[k].numpy(), chain, step)
        z = (res.mean - exact[k]) / res.err
        z0 = (res.mean - exact_g0[k]) / res.err
        print(
            f"{k:>17s}: HMC {res.mean:.5f} +- {res.err:.5f} (tau_int {res.tau_int:.2f}), quadrature {exact[k]:.5f}"
            f" z = {z:+.2f}; g = 0: {exact_g0[k]:.5f}, z = {z0:+.1f}"
        )
        record_z(k, z)
        assert abs(z) < 3, (k, z)
        assert abs(z0) > 30, (k, z0)  # the fermions change the answer: the test has teeth
        assert res.err < 0.005 * abs(exact[k]), (k, res.err)


# --- 7. bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"m2": float("nan"), "lam": 1.0, "g": 0.1}, "m2 must be finite"),
        ({"m2": -1.0, "lam": float("inf"), "g": 0.1}, "lam must be finite"),
        ({"m2": -1.0, "lam": 1.0, "g": float("-inf")}, "g must be finite"),
        ({"m2": -1.0, "lam": 1.0, "g": 0.1, "m_f": float("nan")}, "m_f must be finite"),
        ({"m2": -1.0, "lam": 1.0, "g": True}, "g must be a real number"),
        ({"m2": False, "lam": 1.0, "g": 0.1}, "m2 must be a real number"),
        ({"m2": -1.0, "lam": "1", "g": 0.1}, "lam must be a real number"),
        ({"m2": -1.0, "lam": -0.5, "g": 0.1}, "lam = -0.5"),
        ({"m2": 0.0, "lam": 0.0, "g": 0.1}, "m2 = 0.0 with lam = 0"),
        ({"m2": -2.0, "lam": 0.0, "g": 0.0}, "m2 = -2.0 with lam = 0"),
    ],
)
def test_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        YukawaParams(**kwargs)


def test_odd_time_extent_is_refused():
    with pytest.raises(ValueError, match=r"even time extent.*\[3, 4\]"):
        yukawa(-1.0, 1.0, 0.1, 0.0, (3, 4))
    yukawa(-1.0, 1.0, 0.1, 0.0, (4, 3))  # odd space is allowed


def test_exact_observables_above_dense_max_volume():
    theory = yukawa(-1.0, 1.0, 0.1, 0.0, (4, 4), dense_max_volume=15)
    phi = random_phi((4, 4), 2, 71)
    for method in (theory.action, theory.force, theory.fermion_logdet, theory.condensate):
        with pytest.raises(ValueError, match="volume 16 > dense_max_volume = 15"):
            method(phi)
    assert theory.observable_info()["condensate"].startswith("stochastic")
    with pytest.raises(ValueError, match="even_odd"):
        theory.pseudofermions(even_odd=True)


def test_misspelt_coupling_in_a_job_is_one_line(latflow_cli, make_job, tmp_path):
    theory = {"name": "yukawa", "m2": -4.0, "lamda": 6.0, "g": 0.1}
    make_job(tmp_path, "hmc", {"theory": theory})
    r = latflow_cli.run(("run", "job.toml"), tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == "", str(r)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, str(r)
    line = lines[0]
    assert line.startswith("latflow: error: job.toml"), line
    for word in ("'theory.lamda'", "m2", "lam", "g", "m_f"):
        assert word in line, (word, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml"]
