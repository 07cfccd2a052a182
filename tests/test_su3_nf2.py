"""theories.su3_nf2: SU(N) with Nf = 2 Wilson fermions (registry name "su3-nf2"), d = 2 and d = 4.

Registry and parameter checks; the analytic gauge force against autograd; the exact force of
``S_eff = S_g - log det(D^dag D)`` against a finite difference along ``exp(t Y) U``; the dense
determinant against the even/odd one; gauge invariance of the action and observables; the fermionic
observables (condensate = trace of the propagator, positive pion correlator); the sampler wiring
(``PseudofermionHMC.for_theory`` picks up the SU(N) manifold).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import stat_seed

from latflow.fermions.dense import logdet_normal
from latflow.fermions.evenodd import EvenOddWilson
from latflow.fermions.stochastic_logdet import StochasticLogdetGradient
from latflow.lattice import Lattice
from latflow.manifolds import SUN
from latflow.samplers.pf_hmc import PseudofermionHMC
from latflow.sun import expm_su, haar_sun, random_algebra, sun_gauge_transform
from theories import get_spec
from theories.su3_nf2 import SUNNf2Model, SUNNf2Params

CASES = [(2, (4, 4)), (3, (4, 4)), (2, (2, 2, 2, 2)), (3, (2, 2, 2, 2))]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def model(n: int, shape: tuple[int, ...], beta: float = 3.0, kappa: float = 0.15) -> SUNNf2Model:
    return SUNNf2Model(SUNNf2Params(beta, kappa, n), Lattice(shape))


def test_registry_and_params() -> None:
    spec = get_spec("su3-nf2")
    theory = spec.build(spec.params(beta=4.0, kappa=0.2), Lattice((4, 4)))
    assert isinstance(theory, SUNNf2Model) and theory.n == 3 and spec.field_name == "links"
    assert theory.couplings() == {"beta": 4.0, "kappa": 0.2, "n": 3.0}
    assert isinstance(theory.manifold, SUN) and theory.dirac.n_colors == 3
    for bad in (dict(beta=-1.0, kappa=0.1), dict(beta=1.0, kappa=0.5), dict(beta=1.0, kappa=0.1, n=1)):
        with pytest.raises(ValueError):
            SUNNf2Params(**bad)
    with pytest.raises(ValueError, match="d = 2 and d = 4"):
        SUNNf2Model(SUNNf2Params(1.0, 0.1), Lattice((4, 4, 4)))


@pytest.mark.parametrize("n,shape", CASES)
def test_gauge_force_matches_autograd(n: int, shape: tuple[int, ...]) -> None:
    m = model(n, shape)
    u = haar_sun((2, len(shape), *shape), n, gen(1))
    torch.testing.assert_close(m.gauge_force(u), m.manifold.force(m.gauge_action, u), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,shape", CASES)
def test_effective_force_matches_finite_difference(n: int, shape: tuple[int, ...]) -> None:
    m = model(n, shape)
    g = gen(2)
    u = expm_su(0.5 * random_algebra((2, len(shape), *shape), n, g))
    y = random_algebra(tuple(u.shape[:-2]), n, g)
    h = 1e-4
    numeric = (m.action(expm_su(h * y) @ u) - m.action(expm_su(-h * y) @ u)) / (2 * h)
    analytic = 2.0 * (y.conj() * m.force(u)).flatten(1).sum(1).real
    torch.testing.assert_close(analytic, numeric.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n,shape", CASES)
def test_dense_logdet_equals_even_odd_and_is_gauge_invariant(n: int, shape: tuple[int, ...]) -> None:
    m = model(n, shape)
    u = haar_sun((2, len(shape), *shape), n, gen(3))
    ld = m.fermion_logdet(u)
    torch.testing.assert_close(ld, logdet_normal(EvenOddWilson(m.dirac), u), rtol=1e-10, atol=1e-10)
    omega = haar_sun((2, *shape), n, gen(4))
    v = sun_gauge_transform(u, omega)
    torch.testing.assert_close(m.action(v), m.action(u), rtol=1e-10, atol=1e-9)
    a, b = m.observables(u), m.observables(v)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-9, msg=k)
    free = SUNNf2Model(SUNNf2Params(3.0, 0.0, n), Lattice(shape))
    torch.testing.assert_close(free.fermion_logdet(u), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_observables_dense_and_gauge_only() -> None:
    m = model(3, (4, 4))
    u = haar_sun((3, 2, 4, 4), 3, gen(5))
    obs = m.observables(u)
    expected = {"action", "gauge_action", "plaquette", "polyakov_loop", "fermion_logdet", "chiral_condensate"}
    assert expected <= set(obs) and all(v.shape == (3,) for v in obs.values())
    assert set(m.observable_info()) == set(obs)
    torch.testing.assert_close(obs["action"], m.action(u))
    torch.testing.assert_close(obs["chiral_condensate"], m.chiral_condensate(u))
    corr = m.pion_correlator(u)
    assert corr.shape == (3, 4) and bool((corr > 0).all())
    big = SUNNf2Model(SUNNf2Params(3.0, 0.15), Lattice((4, 4)), dense_max_dim=10)
    obs_big = big.observables(u)
    assert "action" not in obs_big and "chiral_condensate" not in obs_big and "gauge_action" in obs_big
    assert m.exact_means() == {} and model(3, (2, 2, 2, 2)).exact_means() == {"topological_charge": 0.0}


def test_pf_hmc_for_theory_uses_sun_manifold() -> None:
    m = model(3, (4, 4), beta=4.0, kappa=0.2)
    u0 = m.initial_field(2, gen(6), "hot")
    s = PseudofermionHMC.for_theory(m, u0, step_size=0.1, n_steps=2, generator=gen(7), even_odd=True)
    block = s.run(1)
    assert isinstance(s.manifold, SUN) and block.x.shape == u0.shape and block.x.is_complex()
    eye = torch.eye(3, dtype=u0.dtype)
    torch.testing.assert_close(block.x @ block.x.conj().transpose(-1, -2), eye.expand_as(block.x))
    assert int(s.last_cg_iterations.min()) > 0


@pytest.mark.statistical
def test_stochastic_logdet_gradient_on_sun_links(record_z) -> None:
    """2x2 SU(3): the Z2-noise estimate of ``d log det(D^dag D)`` along ``exp(t Y) U``, ``Y`` the exact su(3)
    force (one noise vector per draw, 2000 draws) against autograd of the dense determinant; |z| < 3."""
    m = model(3, (2, 2), kappa=0.2)
    u = haar_sun((1, 2, 2, 2), 3, gen(8))
    ug = u.clone().requires_grad_(True)
    (exact_grad,) = torch.autograd.grad(m.fermion_logdet(ug).sum(), ug)
    y = m.manifold.lie_force(exact_grad, u)  # the steepest direction: a large signal against the noise
    direction = lambda g: (g.conj() * (y @ u)).flatten(1).sum(1).real  # noqa: E731
    n_draws = 2000
    est = StochasticLogdetGradient(m.dirac, gen(stat_seed(4100)), n_noise=1, tol=1e-10)
    samples = direction(est.gradient(u.expand(n_draws, -1, -1, -1, -1, -1).contiguous()))
    exact = float(direction(exact_grad)[0])
    mean, err = float(samples.mean()), float(samples.std() / math.sqrt(n_draws))
    z = (mean - exact) / err
    record_z("dlogdet", z)
    assert abs(exact) > 5 * err, (exact, err)
    assert abs(z) < 3, (mean, err, exact)
