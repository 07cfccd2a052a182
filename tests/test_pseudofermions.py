"""Pseudofermions for Nf = 2 Wilson fermions on U(1) links (latflow.fermions.pseudofermions).

- heatbath: ``S(phi) = |chi|^2`` draw by draw, and ``<S> = n`` (complex components) within 4 sigma;
- unbiasedness: with ``phi`` from the heatbath of a reference operator ``A0``,
  ``<exp(-S_A(phi) + S_A0(phi))> = det(A^dag A) / det(A0^dag A0)`` (exact dense determinants) within
  4 sigma, for the plain, even/odd and Hasenbusch-ratio factors and for the whole Nf = 2 container
  (a telescoping product of factors), on 4x4;
- forces: the closed-form ``d Re(a^dag H b)/dtheta`` against autograd through the Wilson hopping
  term; every factor's force against central finite differences of its action (float64);
- PF-HMC on float32 links accumulates its Hamiltonian in float64;
- validation of the container's parameters.

Statistical tests take their seeds from ``stat_seed`` (the links stay fixed, the noise moves); their
bound is 4 sigma for a family of 14 z-scores (family-wise false-alarm rate ~0.1%).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import stat_seed

from latflow.analysis import gamma_method
from latflow.fermions.dense import logdet_normal
from latflow.fermions.evenodd import EvenOddWilson
from latflow.fermions.pseudofermions import (
    HasenbuschRatioFactor,
    Nf2Pseudofermions,
    PseudofermionFactor,
    complex_gaussian,
    heatbath,
    hop_derivative,
)
from latflow.fermions.wilson import WilsonDirac, u1_links
from latflow.lattice import Lattice

F64 = torch.float64
LAT = Lattice((4, 4))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def links(seed: int, batch: int = 1, shape: tuple[int, int] = (4, 4), width: float = 0.8) -> torch.Tensor:
    """Smooth-ish random link angles ``[batch, 2, *shape]`` (Gaussian of the given width)."""
    return width * torch.randn((batch, 2, *shape), generator=gen(seed), dtype=F64)


def z_score(samples: torch.Tensor, exact: float) -> tuple[float, float, float]:
    """``(z, mean, err)`` of independent samples against an exact value (Gamma-method error)."""
    r = gamma_method(samples.detach().numpy())
    return (r.mean - exact) / r.err, r.mean, r.err


# --- heatbath ----------------------------------------------------------------------------------


@pytest.mark.statistical
def test_complex_gaussian_normalisation(record_z):
    chi = complex_gaussian((20000,), gen(stat_seed(1)))
    assert chi.dtype == torch.complex128
    z, _, _ = z_score(chi.abs() ** 2, 1.0)
    record_z("|chi|^2", z, 4.0)
    assert abs(z) < 4
    z, _, _ = z_score(chi.real * chi.imag, 0.0)  # independent real and imaginary parts
    record_z("Re chi Im chi", z, 4.0)
    assert abs(z) < 4
    assert complex_gaussian((3,), gen(1), dtype=torch.complex64).dtype == torch.complex64


@pytest.mark.parametrize(
    "even_odd, kappas",
    [(False, ()), (True, ()), (False, (0.12,)), (True, (0.08, 0.15))],
    ids=["plain", "eo", "hb", "eo-hb2"],
)
@pytest.mark.statistical
def test_heatbath_action_is_chi_squared(even_odd, kappas, record_z):
    """``S_f(phi_f) = |chi_f|^2`` draw by draw; ``<S> = n_components`` per factor."""
    b = 400
    pf = Nf2Pseudofermions(WilsonDirac(LAT, 0.21), even_odd=even_odd, hasenbusch_kappas=kappas, tol=1e-12)
    U = u1_links(links(2).expand(b, -1, -1, -1))
    phis, s = pf.refresh(U, gen(stat_seed(3)))
    per = pf.factor_actions(U, phis)
    torch.testing.assert_close(sum(per), s, rtol=1e-9, atol=0)
    n = 16 * 2 // (2 if even_odd else 1)
    assert pf.n_components == n and len(phis) == 1 + len(kappas)
    for i, (phi, s_f) in enumerate(zip(phis, per)):
        if even_odd:  # even/odd pseudofermions vanish on odd sites
            assert not bool(phi[:, LAT.checkerboard(1)].any())
        z, _, _ = z_score(s_f, float(n))
        print(f"<S_pf> at the heatbath against n = {n}: z = {z:+.2f}")
        record_z(f"S_pf[{i}]", z, 4.0)
        assert abs(z) < 4, z
    # solves: the plain factor's action; each ratio factor's heatbath and action
    assert pf.n_solves == [1] + [2] * len(kappas)
    assert pf.total_iterations.shape == (b,)


def test_module_heatbath_function():
    """``heatbath(op, U, g) = (A^dag chi, chi)`` for D and for M_hat (chi zero on odd sites)."""
    dirac = WilsonDirac(LAT, 0.2)
    U = u1_links(links(4, batch=3))
    phi, chi = heatbath(dirac, U, gen(5))
    torch.testing.assert_close(phi, dirac.apply_dagger(U, chi))
    eo = EvenOddWilson(dirac)
    phi, chi = heatbath(eo, U, gen(5))
    assert not bool(chi[:, LAT.checkerboard(1)].any())
    torch.testing.assert_close(phi, eo.apply_dagger(U, chi))


# --- unbiasedness against exact determinants --------------------------------------------------------

N_DRAWS = 3000


def reweight_z(target, reference, U: torch.Tensor, phi, exact_log_ratio: float) -> float:
    """z-score of ``<exp(-S_target + S_ref)>`` (``phi`` from the reference heatbath) against the exact ratio."""
    w = torch.exp(-target.action(U, phi) + reference.action(U, phi))
    z, mean, err = z_score(w, math.exp(exact_log_ratio))
    print(f"reweighting: exact {math.exp(exact_log_ratio):.5f}, estimate {mean:.5f} +- {err:.5f}, z = {z:+.2f}")
    # the test must be able to see a wrong determinant: the ratio is many errors away from 1
    assert abs(math.exp(exact_log_ratio) - 1) > 8 * err, (mean, err, exact_log_ratio)
    return z


def ld(dirac: WilsonDirac, U: torch.Tensor, even_odd: bool = False) -> float:
    op = EvenOddWilson(dirac) if even_odd else dirac
    return float(logdet_normal(op, U[:1])[0])


@pytest.mark.parametrize("even_odd", [False, True], ids=["plain", "eo"])
@pytest.mark.statistical
def test_plain_factor_is_unbiased(even_odd, record_z):
    k0, k = 0.2, 0.215
    d0, d = WilsonDirac(LAT, k0), WilsonDirac(LAT, k)
    U = u1_links(links(6).expand(N_DRAWS, -1, -1, -1))
    exact = ld(d, U, even_odd) - ld(d0, U, even_odd)
    # det M_hat = det D: the even/odd determinants equal the full ones
    assert abs(exact - (ld(d, U) - ld(d0, U))) < 1e-10
    f0 = PseudofermionFactor(d0, even_odd=even_odd, tol=1e-11)
    f = PseudofermionFactor(d, even_odd=even_odd, tol=1e-11)
    z = reweight_z(f, f0, U, f0.heatbath(U, gen(stat_seed(7)))[0], exact)
    record_z("det ratio", z, 4.0)
    assert abs(z) < 4, z


@pytest.mark.parametrize("even_odd", [False, True], ids=["plain", "eo"])
@pytest.mark.statistical
def test_hasenbusch_ratio_factor_is_unbiased(even_odd, record_z):
    """``<exp(-S + S0)> = [det(D^dag D)/det(D'^dag D')] / [det(D0^dag D0)/det(D0'^dag D0')]``."""
    (k0, h0), (k, h) = (0.2, 0.1), (0.214, 0.11)
    U = u1_links(links(8).expand(N_DRAWS, -1, -1, -1))
    w = {kk: WilsonDirac(LAT, kk) for kk in (k0, h0, k, h)}
    exact = (ld(w[k], U) - ld(w[h], U)) - (ld(w[k0], U) - ld(w[h0], U))
    ref = HasenbuschRatioFactor(w[k0], w[h0], even_odd=even_odd, tol=1e-11)
    tgt = HasenbuschRatioFactor(w[k], w[h], even_odd=even_odd, tol=1e-11)
    z = reweight_z(tgt, ref, U, ref.heatbath(U, gen(stat_seed(9)))[0], exact)
    record_z("det ratio", z, 4.0)
    assert abs(z) < 4, z


@pytest.mark.statistical
def test_nf2_container_is_unbiased_for_the_full_determinant(record_z):
    """Two Hasenbusch factors telescope: the product estimates ``det(D^dag D) / det(D0^dag D0)``."""
    k0, k = 0.2, 0.212
    U = u1_links(links(10).expand(N_DRAWS, -1, -1, -1))
    ref = Nf2Pseudofermions(WilsonDirac(LAT, k0), hasenbusch_kappas=(0.1,), even_odd=True, tol=1e-11)
    tgt = Nf2Pseudofermions(WilsonDirac(LAT, k), hasenbusch_kappas=(0.11,), even_odd=True, tol=1e-11)
    exact = ld(WilsonDirac(LAT, k), U) - ld(WilsonDirac(LAT, k0), U)
    z = reweight_z(tgt, ref, U, ref.heatbath(U, gen(stat_seed(11))), exact)
    record_z("det ratio", z, 4.0)
    assert abs(z) < 4, z


# --- forces -----------------------------------------------------------------------------------


def test_hop_derivative_matches_autograd():
    """Closed form of ``d Re(a^dag H b)/dtheta`` against autograd through ``WilsonDirac.hop`` (4x4 and 4x6)."""
    for shape, apbc in (((4, 4), True), ((4, 6), False)):
        dirac = WilsonDirac(Lattice(shape), 0.2, antiperiodic_time=apbc)
        theta = links(12, batch=2, shape=shape, width=2.0)
        a = complex_gaussian((2, *shape, 2), gen(13))
        b = complex_gaussian((2, *shape, 2), gen(14))
        th = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((a.conj() * dirac.hop(u1_links(th), b)).sum().real, th)
        torch.testing.assert_close(hop_derivative(dirac, u1_links(theta), a, b), grad, rtol=0, atol=1e-12)


def finite_difference_gradient(action, theta: torch.Tensor, phi, h: float = 1e-4) -> torch.Tensor:
    """Central differences of ``action(theta_batch, phi_batch)`` for one configuration ``[1, 2, *L]``,
    all ``2 * n_links`` displaced configurations in one batch."""
    n = theta[0].numel()
    disp = torch.eye(n, dtype=F64).reshape(n, *theta.shape[1:]) * h
    batch = torch.cat([theta + disp, theta - disp])
    reps = [p.expand(2 * n, *p.shape[1:]) for p in phi]
    s = action(batch, reps)
    return ((s[:n] - s[n:]) / (2 * h)).reshape(theta.shape)


@pytest.mark.parametrize(
    "even_odd, kappas",
    [(False, ()), (True, ()), (False, (0.1,)), (True, (0.07, 0.14))],
    ids=["plain", "eo", "hb", "eo-hb2"],
)
def test_force_matches_finite_differences(even_odd, kappas):
    pf = Nf2Pseudofermions(WilsonDirac(LAT, 0.22), even_odd=even_odd, hasenbusch_kappas=kappas, tol=1e-13)
    theta = links(15)
    phis = pf.heatbath(u1_links(theta), gen(16))
    force = pf.force(theta, phis)
    fd = finite_difference_gradient(lambda t, p: pf.action(u1_links(t), p), theta, phis)
    assert force.shape == theta.shape and force.abs().max() > 0.1
    torch.testing.assert_close(force, fd, rtol=0, atol=2e-7)


def test_force_vanishes_at_kappa_zero():
    pf = Nf2Pseudofermions(WilsonDirac(LAT, 0.0), even_odd=True)
    theta = links(17, batch=2)
    phis = pf.heatbath(u1_links(theta), gen(18))
    assert torch.equal(pf.force(theta, phis), torch.zeros_like(theta))
    torch.testing.assert_close(pf.action(u1_links(theta), phis), (phis[0].abs() ** 2).sum((1, 2, 3)))


def test_force_is_gauge_covariant():
    """Under ``U -> Omega U Omega^dag(x+mu)``, ``phi -> Omega phi``: the action and force are unchanged."""
    pf = Nf2Pseudofermions(WilsonDirac(LAT, 0.2), hasenbusch_kappas=(0.1,), tol=1e-12)
    theta = links(19, batch=2)
    phis = pf.heatbath(u1_links(theta), gen(20))
    alpha = 3.0 * torch.randn((2, 4, 4), generator=gen(21), dtype=F64)
    theta_g = torch.stack([alpha + theta[:, mu] - torch.roll(alpha, -1, dims=1 + mu) for mu in range(2)], dim=1)
    phis_g = [torch.polar(torch.ones_like(alpha), alpha).unsqueeze(-1) * p for p in phis]
    s, s_g = pf.action(u1_links(theta), phis), pf.action(u1_links(theta_g), phis_g)
    torch.testing.assert_close(s_g, s, rtol=1e-9, atol=0)
    torch.testing.assert_close(pf.force(theta_g, phis_g), pf.force(theta, phis), rtol=0, atol=1e-9)


def test_complex64_runs():
    pf = Nf2Pseudofermions(WilsonDirac(LAT, 0.2), even_odd=True, hasenbusch_kappas=(0.1,), tol=1e-5)
    theta = links(22, batch=2).float()
    U = u1_links(theta)
    phis, s = pf.refresh(U, gen(23))
    assert phis[0].dtype == torch.complex64 and s.dtype == torch.float32
    assert pf.force(theta, phis).dtype == torch.float32
    torch.testing.assert_close(pf.action(U, phis), s, rtol=1e-3, atol=0)


def test_pf_hmc_hamiltonian_is_float64_for_float32_links():
    """PF-HMC on float32 links accumulates ``H`` in float64 (as HMC does): ``delta_H`` is float64."""
    from latflow.samplers import PseudofermionHMC
    from latflow.theories.schwinger import SchwingerModel, SchwingerParams

    theory = SchwingerModel(SchwingerParams(2.0, 0.2), LAT)
    s = PseudofermionHMC.for_theory(
        theory, links(24, batch=3).float(), step_size=0.1, n_steps=3, generator=gen(25), even_odd=True, tol=1e-6
    )
    s.run(2)
    assert s.x.dtype == torch.float32
    assert s.last_run_delta_h.dtype == torch.float64 and s.last_run_delta_h.shape == (2, 3)
    assert bool(torch.isfinite(s.last_run_delta_h).all())


# --- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(hasenbusch_kappas=(0.25,)),  # not below kappa
        dict(hasenbusch_kappas=(0.0,)),
        dict(hasenbusch_kappas=(-0.1,)),
        dict(hasenbusch_kappas=(0.15, 0.1)),  # not increasing
        dict(hasenbusch_kappas=(0.1, 0.1)),
        dict(hasenbusch_kappas=(float("nan"),)),
        dict(tol=0.0),
        dict(tol=float("nan")),
        dict(max_iter=0),
    ],
)
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        Nf2Pseudofermions(WilsonDirac(LAT, 0.2), **kwargs)


def test_even_odd_needs_even_extents_and_pseudofermion_count_is_checked():
    with pytest.raises(ValueError):
        Nf2Pseudofermions(WilsonDirac(Lattice((4, 5)), 0.2), even_odd=True)
    pf = Nf2Pseudofermions(WilsonDirac(LAT, 0.2), hasenbusch_kappas=(0.1,))
    U = u1_links(links(24))
    phis = pf.heatbath(U, gen(25))
    with pytest.raises(ValueError):
        pf.action(U, phis[:1])
