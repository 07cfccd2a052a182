"""Pseudofermions on SU(N) links: closed-form link gradients and forces, group-generic PF-HMC and pf-flow-mcmc.

- ``hop_link_gradient``: ``G = d Re(a^dag H b)/dU`` against torch autograd (same complex convention) for
  N = 2, 3 in d = 2 and d = 4, and the U(1) route (``U1Angles.link_force``) against the angle force;
- every factor's su(N) force (plain, even/odd, Hasenbusch ratio, the Nf = 2 container) against a central
  finite difference of its action along ``exp(t Y) U``;
- PF-HMC on 2D SU(3) with fermions: reversibility of the integrator and ``dH ~ eps^2``;
- exactness (statistical, seeds from ``stat_seed``): PF-HMC (even/odd + one Hasenbusch factor) on 4x4
  SU(3) against HMC on the exact effective action ``S_g - log det(D^dag D)`` (dense determinant, autograd
  force); pf-flow-mcmc with a Haar proposal on 2x2 SU(3) against exact-determinant reweighting of Haar
  samples. Errors from the spread of independent chain means (Student t mapped to a normal z).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import stat_seed
from scipy import stats

from latflow.fermions.dense import logdet_normal
from latflow.fermions.pseudofermions import (
    HasenbuschRatioFactor,
    Nf2Pseudofermions,
    PseudofermionFactor,
    hop_derivative,
    hop_link_gradient,
)
from latflow.fermions.wilson import WilsonDirac
from latflow.lattice import Lattice
from latflow.manifolds import SUN, U1Angles
from latflow.samplers.hmc import HMC
from latflow.samplers.pf_flow_mcmc import JointTarget, PseudofermionFlowMCMC
from latflow.samplers.pf_hmc import PseudofermionHMC
from latflow.sun import expm_su, haar_sun, random_algebra
from theories.su3_nf2 import SUNNf2Model, SUNNf2Params

CASES = [(2, (4, 4)), (3, (4, 4)), (2, (2, 2, 2, 2)), (3, (2, 2, 2, 2))]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_links(n: int, shape: tuple[int, ...], seed: int, batch: int = 2, width: float = 0.5) -> torch.Tensor:
    """SU(N) links ``[batch, d, *shape, N, N]`` near the identity (``exp`` of Gaussian su(N) of the given width)."""
    g = gen(seed)
    return expm_su(width * random_algebra((batch, len(shape), *shape), n, g))


def t_to_z(t: float, dof: int) -> float:
    """The normal z with the same two-sided tail probability as Student's ``t`` with ``dof`` degrees of freedom."""
    p = stats.t.sf(abs(t), dof)
    return math.copysign(float(stats.norm.isf(p)), t)


# --- closed-form gradients --------------------------------------------------------------------
@pytest.mark.parametrize("n,shape", CASES)
def test_hop_link_gradient_matches_autograd(n: int, shape: tuple[int, ...]) -> None:
    dirac = WilsonDirac(Lattice(shape), 0.2, n_colors=n)
    u = haar_sun((2, len(shape), *shape), n, gen(1))
    g = gen(2)
    a = torch.randn((2, *dirac.field_shape), generator=g, dtype=torch.complex128)
    b = torch.randn((2, *dirac.field_shape), generator=g, dtype=torch.complex128)
    ug = u.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad((a.conj() * dirac.hop(ug, b)).sum().real, ug)
    closed = hop_link_gradient(dirac, u, a, b)
    assert closed.shape == u.shape
    torch.testing.assert_close(closed, auto, rtol=1e-12, atol=1e-12)


def test_u1_link_route_matches_angle_force() -> None:
    """``U1Angles.link_force(hop_link_gradient)`` equals ``hop_derivative`` and the angle force to rounding."""
    dirac = WilsonDirac(Lattice((4, 4)), 0.2)
    theta = 0.8 * torch.randn((2, 2, 4, 4), generator=gen(3), dtype=torch.float64)
    mf = U1Angles()
    u = mf.links(theta)
    g = gen(4)
    a = torch.randn((2, *dirac.field_shape), generator=g, dtype=torch.complex128)
    b = torch.randn((2, *dirac.field_shape), generator=g, dtype=torch.complex128)
    torch.testing.assert_close(
        mf.link_force(hop_link_gradient(dirac, u, a, b), theta), hop_derivative(dirac, u, a, b), rtol=0, atol=1e-13
    )
    pf = Nf2Pseudofermions(dirac, even_odd=True, hasenbusch_kappas=(0.1,), tol=1e-13)
    phis = pf.heatbath(u, gen(5))
    torch.testing.assert_close(
        mf.link_force(pf.link_gradient(u, phis), theta), pf.force(theta, phis), rtol=0, atol=1e-10
    )


def _directional(action, u: torch.Tensor, y: torch.Tensor, h: float = 1e-4) -> torch.Tensor:
    return (action(expm_su(h * y) @ u) - action(expm_su(-h * y) @ u)) / (2 * h)


@pytest.mark.parametrize("n,shape", CASES)
@pytest.mark.parametrize("kind", ["plain", "even_odd", "ratio", "ratio_eo", "nf2"])
def test_sun_factor_force_matches_finite_difference(n: int, shape: tuple[int, ...], kind: str) -> None:
    """``d/dt S(exp(t Y) U) = 2 Re tr(Y^dag F)`` summed over links, per configuration, to ~1e-7 relative."""
    dirac = WilsonDirac(Lattice(shape), 0.15, n_colors=n)
    u = smooth_links(n, shape, 10 + n)
    eo = kind in ("even_odd", "ratio_eo")
    if kind == "nf2":
        factor = Nf2Pseudofermions(dirac, even_odd=True, hasenbusch_kappas=(0.08, 0.12), tol=1e-13)
    elif kind.startswith("ratio"):
        factor = HasenbuschRatioFactor(dirac, dirac.with_kappa(0.1), even_odd=eo, tol=1e-13)
    else:
        factor = PseudofermionFactor(dirac, even_odd=eo, tol=1e-13)
    g = gen(20 + n)
    phi = factor.heatbath(u, g) if kind == "nf2" else factor.heatbath(u, g)[0]
    force = factor.force(u, phi)
    assert force.shape == u.shape
    torch.testing.assert_close(force, -force.conj().transpose(-1, -2))  # in su(N): anti-Hermitian, traceless
    assert float(force.diagonal(dim1=-2, dim2=-1).sum(-1).abs().max()) < 1e-12
    y = random_algebra(tuple(u.shape[:-2]), n, g)
    analytic = 2.0 * (y.conj() * force).flatten(1).sum(1).real
    numeric = _directional(lambda v: factor.action(v, phi), u, y)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.statistical
@pytest.mark.parametrize("hasenbusch", [(), (0.1,)], ids=["plain-eo", "hasenbusch-eo"])
def test_sun_pseudofermions_estimate_the_determinant_ratio(hasenbusch: tuple[float, ...], record_z) -> None:
    """4x4 SU(3), fixed links: with ``phis`` from the heatbath at ``kappa0 = 0.2``,
    ``<exp(-S_pf(kappa) + S_pf(kappa0))> = det(D^dag D)(kappa) / det(D^dag D)(kappa0)`` (dense), 1000 draws; |z| < 3.
    The Hasenbusch case telescopes ``det(A_1^dag A_1) det(A^dag A / A_1^dag A_1)`` with ``kappa_1`` shifted
    by the same 0.005 as ``kappa``."""
    torch.set_num_threads(1)
    n_draws, k0, k = 1000, 0.2, 0.205
    lat = Lattice((4, 4))
    u = smooth_links(3, (4, 4), 60, batch=1, width=0.6).expand(n_draws, -1, -1, -1, -1, -1).contiguous()
    d0, d = WilsonDirac(lat, k0, n_colors=3), WilsonDirac(lat, k, n_colors=3)
    ref = Nf2Pseudofermions(d0, even_odd=True, hasenbusch_kappas=hasenbusch, tol=1e-11)
    tgt = Nf2Pseudofermions(d, even_odd=True, hasenbusch_kappas=tuple(h + 0.005 for h in hasenbusch), tol=1e-11)
    phis, s0 = ref.refresh(u, gen(stat_seed(3300 + len(hasenbusch))))
    w = torch.exp(-tgt.action(u, phis) + s0)
    exact = math.exp(float(logdet_normal(d, u[:1])[0] - logdet_normal(d0, u[:1])[0]))
    mean, err = float(w.mean()), float(w.std() / math.sqrt(n_draws))
    z = (mean - exact) / err
    record_z("det ratio", z)
    print(f"exact {exact:.5f} estimate {mean:.5f} +- {err:.5f} z = {z:+.2f}")
    assert abs(exact - 1) > 5 * err  # the check can see a wrong determinant
    assert abs(z) < 3, (mean, err, exact)


# --- PF-HMC on SU(3) ---------------------------------------------------------------------------
def _model(shape: tuple[int, int] = (4, 4), beta: float = 4.0, kappa: float = 0.2) -> SUNNf2Model:
    return SUNNf2Model(SUNNf2Params(beta, kappa), Lattice(shape))


def test_pf_hmc_sun_reversible() -> None:
    """Forward ``tau = 1``, flip momenta, forward again: back to the start links to 1e-10 (zero CG guesses)."""
    m = _model()
    u0 = smooth_links(3, (4, 4), 30, batch=2, width=0.4)
    s = PseudofermionHMC.for_theory(
        m, u0, step_size=0.1, n_steps=10, generator=gen(31), even_odd=True, hasenbusch_kappas=(0.1,), tol=1e-12
    )
    assert isinstance(s.manifold, SUN)
    p0 = s.manifold.random_momenta(u0, gen(32))
    s._phis = s.pseudofermions.heatbath(u0, gen(33))
    u1, p1 = s._integrate(u0, p0, 0.1, 10)
    u2, p2 = s._integrate(u1, -p1, 0.1, 10)
    s._phis = None
    assert float((u2 - u0).abs().max()) < 1e-10
    assert float((p2 + p0).abs().max()) < 1e-10


def test_pf_hmc_sun_delta_h_scales_as_eps_squared() -> None:
    """Leapfrog, fixed ``tau = 0.5``: ``<|dH|>`` drops by ~4 when the step halves (ratio in [3, 5.3])."""
    m = _model()
    u0 = smooth_links(3, (4, 4), 40, batch=8, width=0.4)
    dh = {}
    for n_steps in (5, 10):
        s = PseudofermionHMC.for_theory(
            m,
            u0,
            step_size=0.5 / n_steps,
            n_steps=n_steps,
            generator=gen(41),
            even_odd=True,
            hasenbusch_kappas=(0.1,),
            integrator="leapfrog",
            tol=1e-12,
        )
        _, d = s.trajectory()
        dh[n_steps] = float(d.abs().mean())
    ratio = dh[5] / dh[10]
    assert 3.0 < ratio < 5.3, (dh, ratio)


def test_pf_hmc_sun_rejects_angles() -> None:
    m = _model()
    with pytest.raises(ValueError, match="SU\\(3\\) links"):
        PseudofermionHMC.for_theory(m, torch.zeros(1, 2, 4, 4), step_size=0.1, n_steps=1, generator=gen(0))


N_CHAINS = 16


def _chain_means(values: torch.Tensor) -> torch.Tensor:
    """``[n_traj * B]`` trajectory-major rows -> ``[B]`` chain means."""
    return values.reshape(-1, N_CHAINS).mean(dim=0)


@pytest.mark.statistical
@pytest.mark.parametrize(
    "shape", [(4, 2), pytest.param((4, 4), marks=pytest.mark.slow)], ids=lambda s: "x".join(map(str, s))
)
def test_pf_hmc_sun_matches_exact_determinant_hmc(shape: tuple[int, int], record_z) -> None:
    """SU(3), beta = 4, kappa = 0.2 on 4x2 (4x4: slow, ~2 min): plaquette and condensate of PF-HMC (even/odd,
    one Hasenbusch factor at kappa' = 0.1) against HMC on ``S_g - log det(D^dag D)`` (dense, autograd
    force); 16 chains each, burnt in by the exact chain from a cold start; |z| < 3."""
    torch.set_num_threads(1)
    m = _model(shape)
    seed = stat_seed(3100 + shape[1])
    g = gen(seed)
    u_cold = m.initial_field(2 * N_CHAINS, g, "cold")
    burn = HMC(m.action, u_cold, step_size=1 / 3, n_steps=3, generator=g, integrator="omelyan",
               force=m.force, manifold=m.manifold)  # fmt: skip
    burn.run(12 if shape == (4, 2) else 40)  # the 4x4 condensate relaxes over ~20 trajectories from cold
    starts = burn.x
    n_traj = 30
    t0 = time.perf_counter()
    exact = HMC(m.action, starts[:N_CHAINS], step_size=1 / 3, n_steps=3, generator=g, integrator="omelyan",
                force=m.force, manifold=m.manifold)  # fmt: skip
    block_ex = exact.run(n_traj)
    t1 = time.perf_counter()
    pf = PseudofermionHMC.for_theory(
        m, starts[N_CHAINS:], step_size=1 / 3, n_steps=3, generator=g, even_odd=True, hasenbusch_kappas=(0.1,), tol=1e-9
    )
    block_pf = pf.run(n_traj)
    t2 = time.perf_counter()
    report = {}
    for name in ("plaquette", "chiral_condensate"):
        a = _chain_means(m.observables(block_ex.x)[name])
        b = _chain_means(m.observables(block_pf.x)[name])
        err = math.sqrt(float(a.var() / N_CHAINS + b.var() / N_CHAINS))
        t = float(b.mean() - a.mean()) / err
        z = t_to_z(t, N_CHAINS - 1)
        record_z(name, z)
        report[name] = f"exact {float(a.mean()):.4f} pf {float(b.mean()):.4f} +- {err:.4f} z={z:+.2f}"
    acc_ex, acc_pf = float(block_ex.accepted.float().mean()), float(block_pf.accepted.float().mean())
    cg = float(pf.last_run_cg_iterations.double().mean())
    print(report, f"acc exact {acc_ex:.3f} pf {acc_pf:.3f}; CG/traj {cg:.0f}; {t1 - t0:.1f} s, {t2 - t1:.1f} s")
    assert acc_pf > 0.7 and acc_ex > 0.7
    for line in report.values():
        assert abs(float(line.split("z=")[1])) < 3, report


# --- pf-flow-mcmc on SU(3) -----------------------------------------------------------------------
class HaarProposal:
    """Independent Haar-random SU(N) links, ``log q = 0`` (density relative to the Haar measure)."""

    def __init__(self, field_shape: tuple[int, ...], n: int) -> None:
        self.shape = tuple(field_shape[:-2])
        self.n = n

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        u = haar_sun((batch, *self.shape), self.n, generator)
        return u, torch.zeros(batch, dtype=torch.float64)


@pytest.mark.statistical
def test_pf_flow_mcmc_sun_matches_exact_reweighting(record_z) -> None:
    """2x2 SU(3), beta = 1, kappa = 0.2, even/odd + one Hasenbusch factor, default conditional, Haar
    proposals: 16 chains of 500 proposals; plaquette and condensate against self-normalised exact-determinant
    reweighting of 10000 Haar configurations (delta-method error); |z| < 3."""
    torch.set_num_threads(1)
    m = _model((2, 2), beta=1.0)
    prior = HaarProposal(m.field_shape, 3)
    seed = stat_seed(3200)
    g = gen(seed)
    u, _ = prior.sample(10000, g)
    log_w = -torch.cat([m.action(u[i : i + 2000]) for i in range(0, 10000, 2000)])
    w = torch.exp(log_w - log_w.max())
    w = w / w.sum()
    obs_ref = m.observables(u)
    means = {k: [] for k in ("plaquette", "chiral_condensate")}
    acc = 0.0
    for c in range(N_CHAINS):
        s = PseudofermionFlowMCMC.for_theory(
            m, prior, batch_size=500, generator=gen(seed + 1 + c), even_odd=True, hasenbusch_kappas=(0.1,)
        )
        assert isinstance(s.manifold, SUN)
        block = s.run(500)
        acc += float(block.accepted.float().mean()) / N_CHAINS
        obs = m.observables(block.x)
        for k in means:
            means[k].append(float(obs[k].mean()))
    report = {}
    for k, v in means.items():
        o = obs_ref[k]
        ref = float((w * o).sum())
        ref_err = math.sqrt(float((w * w * (o - ref) ** 2).sum()))
        cm = torch.tensor(v)
        err = math.hypot(float(cm.std() / math.sqrt(N_CHAINS)), ref_err)
        z = t_to_z((float(cm.mean()) - ref) / err, N_CHAINS - 1)
        record_z(k, z)
        report[k] = (z, f"{float(cm.mean()):.4f} ref {ref:.4f} +- {err:.4f}")
    print(report, f"acceptance {acc:.3f}")
    assert acc > 0.05
    assert all(abs(z) < 3 for z, _ in report.values()), report


def test_joint_target_link_gradient_sun() -> None:
    """The joint target's gradient in complex SU(3) links (closed-form ``G = dS_pf/dU`` plus autograd of
    ``S_g``) against a finite difference along ``exp(t Y) U``: ``d/dt = Re tr(G^dag Y U)``."""
    m = _model((2, 2), beta=2.0, kappa=0.15)
    pf = Nf2Pseudofermions(m.dirac, even_odd=True, hasenbusch_kappas=(0.1,), tol=1e-13)
    target = JointTarget(m.gauge_action, pf)
    assert isinstance(target.manifold, SUN)
    g = gen(50)
    u = haar_sun((2, 2, 2, 2), 3, g)
    phis = pf.heatbath(u, g)
    ug = u.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(target((ug, phis)).sum(), ug)
    y = random_algebra((2, 2, 2, 2), 3, g)
    numeric = _directional(lambda v: target((v, phis)), u, y, h=1e-5)
    analytic = (grad.conj() * (y @ u)).flatten(1).sum(1).real
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-7)
