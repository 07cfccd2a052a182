"""U(1) gauge utilities (latflow.gauge) and the U(1) Wilson theory (latflow.theories.u1).

Exact torus formulas against docs/REFERENCES.md, geometry against explicit loops over
sites, gauge invariance, integer topological charge, Haar prior, staples, the analytic
force, the exact independent sampler of the 2D torus, and seeded statistical checks (Haar
sampling at beta = 0, the exact sampler, HMC at beta = 1 to 6) against the exact finite-volume
values. Statistical tests take their seeds from ``stat_seed`` (``--seed-offset``).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import stat_seed
from scipy import integrate
from scipy.special import ive

from latflow.analysis import gamma_method
from latflow.gauge import (
    UniformU1Prior,
    plane_index,
    planes,
    random_u1_gauge_transform,
    u1_gauge_transform,
    u1_plaquette_angles,
    u1_polyakov_loop,
    u1_staples,
    u1_wilson_loops,
    wrap_angle,
)
from latflow.lattice import Lattice
from latflow.samplers import HMC
from latflow.samplers.hmc import action_force
from latflow.theories import REGISTRY, get_spec
from latflow.theories.u1 import (
    U1GaugeAction,
    U1Params,
    _j_integrals,
    exact_plaquette,
    exact_plaquette_infinite,
    exact_q2,
    exact_topological_susceptibility,
    exact_topological_susceptibility_infinite,
    exact_wilson_loop,
    sample_exact_2d,
    sample_plaquettes_2d,
    topological_charge,
    u1_links_with_plaquettes,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def haar(shape: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    """Haar-random links ``[batch, d, *shape]``."""
    return UniformU1Prior(Lattice(shape), dtype=F64).sample(batch, gen(seed))[0]


# --- exact results: docs/REFERENCES.md, 2D U(1) ----------------------------

# (beta, <cos theta_p> L=16, <Q^2> L=16) as printed in REFERENCES.md
REFERENCE_TABLE = [
    (1.0, 0.4463899659, 10.402876),
    (2.0, 0.6977746580, 4.957196),
    (4.0, 0.8635226110, 1.933879),
    (6.0, 0.9123593044, 1.194701),
    (7.0, 0.9255322108, 1.006414),
]
# the same points to 17 digits, from mpmath (30 digits: besseli and adaptive quad of J_k)
HIGH_PRECISION = [
    (1.0, 0.44638996589653450705, 10.402876442898464),
    (2.0, 0.69777465796400798201, 4.9571956807622358),
    (4.0, 0.86352261102455058718, 1.9338785421848158),
    (6.0, 0.91235930435507699873, 1.1947014482435513),
    (7.0, 0.92553221085426589193, 1.0064141578639782),
]


@pytest.mark.parametrize("beta, plaq, q2", REFERENCE_TABLE)
def test_exact_values_match_reference_table(beta: float, plaq: float, q2: float) -> None:
    # one unit in the last printed digit: the beta = 7 plaquette is printed truncated
    # (exact 0.925532210854..., see HIGH_PRECISION), all others are correctly rounded
    assert abs(exact_plaquette(beta, (16, 16)) - plaq) <= 1e-10
    assert abs(exact_q2(beta, (16, 16)) - q2) <= 1e-6
    assert round(exact_q2(beta, (16, 16)), 6) == pytest.approx(q2, abs=1e-12)


@pytest.mark.parametrize("beta, plaq, q2", HIGH_PRECISION)
def test_exact_values_high_precision(beta: float, plaq: float, q2: float) -> None:
    assert exact_plaquette(beta, (16, 16)) == pytest.approx(plaq, rel=1e-13, abs=0)
    assert exact_q2(beta, (16, 16)) == pytest.approx(q2, rel=1e-12, abs=0)


def test_exact_finite_volume_checks() -> None:
    assert round(exact_plaquette(6.0, (8, 8)), 10) == pytest.approx(0.9124549149, abs=1e-13)
    assert round(exact_q2(6.0, (8, 8)), 6) == pytest.approx(0.279201, abs=1e-12)
    assert round(exact_q2(2.0, (8, 8)), 6) == pytest.approx(1.239299, abs=1e-12)
    assert round(exact_plaquette(4.0, (4, 4)), 10) == pytest.approx(0.8706977519, abs=1e-13)
    # mpmath, 30 digits
    assert exact_q2(2.0, (8, 8)) == pytest.approx(1.239298910723259, rel=1e-13)
    assert exact_q2(6.0, (8, 8)) == pytest.approx(0.2792008453280226, rel=1e-13)
    assert exact_q2(0.5, (2, 3)) == pytest.approx(0.3526583792497611, rel=1e-13)


def test_exact_infinite_volume_limits() -> None:
    for beta in (0.5, 1.0, 3.0, 7.0):
        assert exact_plaquette(beta, (64, 64)) == pytest.approx(exact_plaquette_infinite(beta), abs=1e-12)
        chi = exact_topological_susceptibility_infinite(beta)
        assert exact_topological_susceptibility(beta, (64, 64)) == pytest.approx(chi, rel=1e-9)
        # area law: <W(A)> -> (I1/I0)^A
        assert exact_wilson_loop(beta, (64, 64), 6) == pytest.approx(exact_plaquette_infinite(beta) ** 6, rel=1e-9)
        # chi_t = <t^2>_{von Mises} / 4 pi^2 by adaptive quadrature
        num = integrate.quad(
            lambda t: t * t * math.exp(beta * (math.cos(t) - 1)), -math.pi, math.pi, epsabs=0, epsrel=1e-13
        )[0]
        den = 2 * math.pi * ive(0, beta)
        assert chi == pytest.approx(num / den / (4 * math.pi**2), rel=1e-11)
    assert exact_plaquette_infinite(2.0) == pytest.approx(0.6977746579640081, abs=1e-15)
    assert exact_wilson_loop(3.0, (5, 6), 1) == exact_plaquette(3.0, (5, 6))


def test_exact_strong_coupling_limit() -> None:
    # beta = 0: plaquette angles independent and uniform apart from the global constraint
    assert exact_plaquette(0.0, (4, 4)) == 0.0
    assert exact_q2(0.0, (4, 4)) == pytest.approx(16 / 12, rel=1e-12)
    assert exact_topological_susceptibility_infinite(0.0) == pytest.approx(1 / 12, rel=1e-12)


@pytest.mark.parametrize("beta", [0.5, 2.0, 7.0])
def test_j_integrals_against_adaptive_quadrature(beta: float) -> None:
    n = np.arange(-6, 7)
    j0, j1, j2 = _j_integrals(beta, n)
    assert np.allclose(j0, ive(np.abs(n), beta), rtol=0, atol=1e-15)  # J_0(n) = I_n(beta)
    for k, jk in ((1, j1), (2, j2)):
        for m, value in zip(n, jk):
            ref = integrate.quad(  # QAWO: adaptive rule for oscillatory weights
                lambda t: t**k * math.exp(beta * (math.cos(t) - 1)),
                -math.pi,
                math.pi,
                weight="cos" if k % 2 == 0 else "sin",
                wvar=float(m),
                epsabs=1e-14,
                epsrel=1e-12,
                limit=200,
            )[0] / (2 * math.pi)
            assert value == pytest.approx(ref, abs=1e-13)


def test_exact_input_validation() -> None:
    with pytest.raises(ValueError):
        exact_plaquette(1.0, (4, 4, 4))
    with pytest.raises(ValueError):
        exact_wilson_loop(1.0, (2, 2), 4)
    with pytest.raises(ValueError):
        exact_q2(-1.0, (4, 4))


# --- wrap_angle -----------------------------------------------------------------


def test_wrap_angle_half_open_boundary() -> None:
    pi = math.pi
    x = torch.tensor([pi, -pi, 3 * pi, -3 * pi, 0.0, 2 * pi, -2 * pi, 0.5, -0.5, pi - 1e-12, -pi + 1e-12], dtype=F64)
    y = wrap_angle(x)
    assert y[0] == pi and y[1] == pi and y[2] == pi and y[3] == pi  # -pi -> +pi: interval is (-pi, pi]
    assert y[4] == 0.0 and abs(y[5]) < 1e-15 and abs(y[6]) < 1e-15
    assert torch.equal(y[7:], x[7:])  # values inside are returned bit for bit
    # just below -pi wraps to just below +pi
    assert wrap_angle(torch.tensor([-pi - 1e-9], dtype=F64)).item() == pytest.approx(pi - 1e-9, abs=1e-14)
    # a tiny negative multiple-of-2pi residue must not produce -pi
    tiny = torch.tensor([-1e-300, -2 * pi - 1e-17, 1e-300], dtype=F64)
    assert torch.all(wrap_angle(tiny) > -pi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wrap_angle_range_and_equivalence(dtype: torch.dtype) -> None:
    x = 40 * torch.randn(10_000, generator=gen(0), dtype=F64)
    x = torch.cat([x, torch.arange(-20, 21, dtype=F64) * math.pi]).to(dtype)
    y = wrap_angle(x)
    pi = torch.tensor(math.pi, dtype=dtype)
    assert y.dtype == dtype and torch.all(y > -pi) and torch.all(y <= pi)
    k = (x.double() - y.double()) / (2 * math.pi)
    tol = 1e-12 if dtype == F64 else 1e-5
    assert torch.allclose(k, k.round(), atol=tol)
    assert torch.equal(wrap_angle(y), y)  # idempotent


# --- plaquettes, planes, staples -------------------------------------------------


def test_plane_order_and_index() -> None:
    for d in range(2, 6):
        ps = planes(d)
        assert len(ps) == d * (d - 1) // 2
        assert ps == sorted(ps) and all(mu < nu for mu, nu in ps)
        for i, (mu, nu) in enumerate(ps):
            assert plane_index(mu, nu, d) == i
    assert plane_index(2, 3, 4) == 5
    with pytest.raises(ValueError):
        plane_index(1, 0, 2)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)])
def test_plaquette_angles_against_explicit_loop(shape: tuple[int, ...]) -> None:
    d = len(shape)
    theta = haar(shape, 2, seed=1)
    plaq = u1_plaquette_angles(theta)
    assert plaq.shape == (2, d * (d - 1) // 2, *shape)
    th = theta.numpy()

    def step(x: tuple[int, ...], mu: int) -> tuple[int, ...]:
        y = list(x)
        y[mu] = (y[mu] + 1) % shape[mu]
        return tuple(y)

    for b in range(2):
        for mu, nu in planes(d):
            for x in itertools.product(*(range(n) for n in shape)):
                ref = th[(b, mu, *x)] + th[(b, nu, *step(x, mu))] - th[(b, mu, *step(x, nu))] - th[(b, nu, *x)]
                got = plaq[(b, plane_index(mu, nu, d), *x)].item()
                assert got == pytest.approx(ref, abs=1e-14)


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 4)])
def test_staples_give_the_action_dependence_on_one_link(shape: tuple[int, ...]) -> None:
    d = len(shape)
    theory = U1GaugeAction(U1Params(1.7), Lattice(shape))
    theta = haar(shape, 3, seed=2)
    g = gen(3)
    for mu in range(d):
        a = u1_staples(theta, mu)
        assert a.shape == (3, *shape) and a.is_complex()
        # sum of the 2(d-1) plaquettes containing each link
        assert a.abs().max() <= 2 * (d - 1) + 1e-12
        for _ in range(3):
            x = tuple(int(torch.randint(n, (), generator=g)) for n in shape)
            delta = float(4 * torch.rand((), generator=g, dtype=F64) - 2)
            moved = theta.clone()
            moved[(slice(None), mu, *x)] += delta
            ds = theory.action(moved) - theory.action(theta)
            u_old = torch.polar(torch.ones(3, dtype=F64), theta[(slice(None), mu, *x)])
            u_new = torch.polar(torch.ones(3, dtype=F64), moved[(slice(None), mu, *x)])
            a_x = a[(slice(None), *x)]
            expected = -theory.beta * ((u_new - u_old) * a_x).real
            assert torch.allclose(ds, expected, atol=1e-12)
            # the staple of that link does not depend on the link itself
            assert torch.allclose(u1_staples(moved, mu)[(slice(None), *x)], a_x, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 4), (3, 4, 2), (2, 2, 3, 2)])
def test_analytic_force_matches_autograd_and_staples(shape: tuple[int, ...]) -> None:
    theory = U1GaugeAction(U1Params(1.3), Lattice(shape))
    theta = 3 * torch.randn((4, len(shape), *shape), generator=gen(4), dtype=F64)
    f = theory.force(theta)
    assert f.shape == theta.shape
    assert torch.allclose(f, action_force(theory.action, theta), atol=1e-12)
    for mu in range(len(shape)):
        u = torch.polar(torch.ones_like(theta[:, mu]), theta[:, mu])
        assert torch.allclose(f[:, mu], theory.beta * (u * u1_staples(theta, mu)).imag, atol=1e-12)


# --- Wilson and Polyakov loops --------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 6), (4, 3, 5)])
def test_wilson_loops_obey_stokes(shape: tuple[int, ...]) -> None:
    d = len(shape)
    theta = haar(shape, 2, seed=5)
    plaq = u1_plaquette_angles(theta)
    for mu, nu in itertools.permutations(range(d), 2):
        lo, hi = min(mu, nu), max(mu, nu)
        sign = 1.0 if mu < nu else -1.0
        p = sign * plaq[:, plane_index(lo, hi, d)]
        for R, T in [(1, 1), (1, 2), (2, 1), (2, 3), (3, 2)]:
            loop = u1_wilson_loops(theta, mu, nu, R, T)
            assert loop.shape == (2, *shape)
            ref = sum(torch.roll(p, shifts=(-a, -b), dims=(1 + mu, 1 + nu)) for a in range(R) for b in range(T))
            assert torch.allclose(loop, ref, atol=1e-12)
            # the reversed loop
            assert torch.allclose(u1_wilson_loops(theta, nu, mu, T, R), -loop, atol=1e-12)
        assert torch.allclose(u1_wilson_loops(theta, mu, nu, 1, 1), p, atol=1e-14)


def test_polyakov_loop_explicit() -> None:
    shape = (3, 4, 2)
    theta = haar(shape, 2, seed=6)
    poly = u1_polyakov_loop(theta)
    assert poly.shape == (2, 4, 2) and poly.is_complex()
    for b, x1, x2 in itertools.product(range(2), range(4), range(2)):
        ref = np.prod([np.exp(1j * theta[b, 0, t, x1, x2].item()) for t in range(3)])
        assert abs(poly[b, x1, x2].item() - ref) < 1e-14


# --- gauge invariance ------------------------------------------------------------


def test_gauge_transform_definition() -> None:
    shape = (3, 4)
    theta = haar(shape, 2, seed=7)
    alpha = random_u1_gauge_transform((2, *shape), gen(8))
    assert alpha.shape == (2, *shape) and torch.all(alpha > -math.pi) and torch.all(alpha <= math.pi)
    out = u1_gauge_transform(theta, alpha)
    for b, mu, t, x in itertools.product(range(2), range(2), range(3), range(4)):
        y = [t, x]
        y[mu] = (y[mu] + 1) % shape[mu]
        ref = alpha[b, t, x] + theta[b, mu, t, x] - alpha[b, y[0], y[1]]
        assert out[b, mu, t, x].item() == pytest.approx(ref.item(), abs=1e-14)
    # a global (constant) transformation does nothing; an unbatched alpha broadcasts
    assert torch.allclose(u1_gauge_transform(theta, torch.full(shape, 0.7, dtype=F64)), theta, atol=1e-14)
    assert torch.allclose(
        u1_gauge_transform(theta, alpha[0]),
        torch.stack([u1_gauge_transform(theta[i : i + 1], alpha[0:1])[0] for i in range(2)]),
        atol=1e-14,
    )


def test_gauge_invariance_2d() -> None:
    shape = (6, 5)
    theory = U1GaugeAction(U1Params(2.0), Lattice(shape))
    theta = haar(shape, 8, seed=9)
    alpha = random_u1_gauge_transform((8, *shape), gen(10))
    moved = u1_gauge_transform(theta, alpha)
    assert (moved - theta).abs().max() > 1.0  # the links really changed
    before = theory.observables(theta)
    for transformed in (moved, wrap_angle(moved)):
        after = theory.observables(transformed)
        assert before.keys() == after.keys()
        for name in before:
            assert torch.allclose(before[name], after[name], atol=1e-10), name
        assert torch.equal(before["topological_charge"].round(), after["topological_charge"].round())
    for R, T in [(1, 2), (2, 2), (3, 1)]:
        w0 = torch.polar(torch.ones(8, *shape, dtype=F64), u1_wilson_loops(theta, 0, 1, R, T))
        w1 = torch.polar(torch.ones(8, *shape, dtype=F64), u1_wilson_loops(moved, 0, 1, R, T))
        assert torch.allclose(w0, w1, atol=1e-12)
    assert torch.allclose(u1_polyakov_loop(theta), u1_polyakov_loop(moved), atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 2, 4)])
def test_gauge_invariance_higher_dimensions(shape: tuple[int, ...]) -> None:
    d = len(shape)
    theory = U1GaugeAction(U1Params(1.5), Lattice(shape))
    theta = haar(shape, 3, seed=11)
    assert theta.shape == (3, d, *shape)
    moved = wrap_angle(u1_gauge_transform(theta, random_u1_gauge_transform((3, *shape), gen(12))))
    assert torch.allclose(theory.action(theta), theory.action(moved), atol=1e-10)
    ones = torch.ones(3, *shape, dtype=F64)
    p0, p1 = u1_plaquette_angles(theta), u1_plaquette_angles(moved)
    assert p0.shape == (3, d * (d - 1) // 2, *shape)
    assert torch.allclose(torch.polar(torch.ones_like(p0), p0), torch.polar(torch.ones_like(p1), p1), atol=1e-12)
    for mu, nu in [(0, d - 1), (d - 1, 1)]:
        w0 = torch.polar(ones, u1_wilson_loops(theta, mu, nu, 2, 1))
        w1 = torch.polar(ones, u1_wilson_loops(moved, mu, nu, 2, 1))
        assert torch.allclose(w0, w1, atol=1e-12)
    assert u1_polyakov_loop(theta).shape == (3, *shape[1:])
    assert torch.allclose(u1_polyakov_loop(theta), u1_polyakov_loop(moved), atol=1e-12)
    obs0, obs1 = theory.observables(theta), theory.observables(moved)
    for name in obs0:
        assert obs0[name].shape == (3,)
        assert torch.allclose(obs0[name], obs1[name], atol=1e-10), name


# --- topological charge -------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 6), (4, 7), (2, 2)])
def test_topological_charge_is_integer_on_the_torus(shape: tuple[int, ...]) -> None:
    theta = 5 * torch.randn((400, 2, *shape), generator=gen(13), dtype=F64)  # not wrapped
    q = topological_charge(theta)
    assert q.shape == (400,)
    assert torch.allclose(q, q.round(), atol=1e-10)
    assert torch.equal(q.round(), topological_charge(wrap_angle(theta)).round())
    if shape[0] * shape[1] >= 16:
        assert len(set(q.round().tolist())) >= 4  # several sectors: the check is not vacuous
    # unwrapped plaquettes sum to zero (the product of all plaquettes is 1)
    assert torch.allclose(u1_plaquette_angles(theta).flatten(1).sum(1), torch.zeros(400, dtype=F64), atol=1e-9)


@pytest.mark.parametrize("q", [-3, -1, 0, 1, 2, 5])
def test_topological_charge_of_constant_field_strength(q: int) -> None:
    L0, L1 = 5, 4
    P = L0 * L1
    theta = torch.zeros(1, 2, L0, L1, dtype=F64)
    theta[0, 1] = (2 * math.pi * q / P) * torch.arange(L0, dtype=F64)[:, None]
    theta[0, 0, L0 - 1] = -(2 * math.pi * q / L1) * torch.arange(L1, dtype=F64)
    plaq = wrap_angle(u1_plaquette_angles(theta))
    assert torch.allclose(plaq, torch.full_like(plaq, 2 * math.pi * q / P), atol=1e-12)
    assert topological_charge(theta).item() == pytest.approx(q, abs=1e-12)
    theory = U1GaugeAction(U1Params(2.5), Lattice((L0, L1)))
    assert theory.action(theta).item() == pytest.approx(-2.5 * P * math.cos(2 * math.pi * q / P), abs=1e-11)


# --- Haar prior ----------------------------------------------------------------------


@pytest.mark.statistical
def test_uniform_prior(record_z) -> None:
    lat = Lattice((4, 3))
    prior = UniformU1Prior(lat, dtype=F64)
    seed = stat_seed(14)
    theta, log_r = prior.sample(2000, gen(seed))
    assert theta.shape == (2000, 2, 4, 3) and log_r.shape == (2000,)
    assert torch.all(theta > -math.pi) and torch.all(theta <= math.pi)
    n_links = 2 * 12
    assert torch.allclose(log_r, torch.full((2000,), -n_links * math.log(2 * math.pi), dtype=F64))
    assert torch.equal(prior.log_prob(theta), log_r)
    assert torch.equal(prior.log_prob(theta + 10.0), log_r)  # Haar density is periodic
    again, _ = prior.sample(2000, gen(seed))
    assert torch.equal(theta, again)
    # moments of the uniform distribution on (-pi, pi], n = 48000 independent angles: z-scores of
    # E t = 0 (variance pi^2/3), E t^2 = pi^2/3 (variance 4 pi^4/45), E cos(k t) = E sin(k t) = 0
    # (variance 1/2); 8 comparisons, each within 4 sigma (a family-wise false alarm rate of 5e-4)
    flat = theta.flatten()
    n = flat.numel()
    z = {
        "mean": flat.mean().item() / (math.pi / math.sqrt(3 * n)),
        "second_moment": (flat.pow(2).mean().item() - math.pi**2 / 3) / (math.pi**2 * math.sqrt(4 / 45 / n)),
    }
    for k in (1, 2, 3):
        z[f"cos{k}"] = torch.cos(k * flat).mean().item() * math.sqrt(2 * n)
        z[f"sin{k}"] = torch.sin(k * flat).mean().item() * math.sqrt(2 * n)
    for name, value in z.items():
        record_z(name, value, 4.0)
    assert all(abs(v) < 4 for v in z.values()), z
    f32 = UniformU1Prior(Lattice((2, 2, 2)), dtype=torch.float32).sample(3, gen(0))[0]
    assert f32.dtype == torch.float32 and f32.shape == (3, 3, 2, 2, 2)
    with pytest.raises(ValueError):
        UniformU1Prior(Lattice((4,)))


@pytest.mark.statistical
def test_haar_samples_reproduce_beta_zero_exactly(record_z) -> None:
    """At beta = 0 the Haar prior is the target: independent samples, exact <Q^2> = P/12."""
    shape = (4, 4)
    theta = haar(shape, 20_000, seed=stat_seed(15))
    theory = U1GaugeAction(U1Params(0.0), Lattice(shape))
    obs = theory.observables(theta)
    q2 = obs["topological_charge_sq"].numpy()
    plaq = obs["plaquette"].numpy()
    z = {
        "topological_charge_sq": (q2.mean() - exact_q2(0.0, shape)) / (q2.std() / math.sqrt(q2.size)),
        "plaquette": plaq.mean() / (plaq.std() / math.sqrt(plaq.size)),
    }
    for name, value in z.items():
        record_z(name, value)
    assert all(abs(v) < 3 for v in z.values()), z


# --- the exact independent sampler of the 2D torus --------------------------------------


@pytest.mark.statistical
@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (8, 8)])
def test_links_with_given_plaquettes(shape: tuple[int, int], record_z) -> None:
    """u1_links_with_plaquettes reproduces the plaquettes it is given, with uniform holonomies."""
    g = gen(stat_seed(30))
    n = 4000
    plaq = sample_plaquettes_2d(0.7, shape, n, g)
    assert plaq.shape == (n, *shape) and plaq.dtype == F64
    assert bool(((plaq > -math.pi) & (plaq <= math.pi)).all())
    q = plaq.flatten(1).sum(1) / (2 * math.pi)  # the constraint: sum of the plaquettes = 2 pi Q
    assert torch.allclose(q, q.round(), atol=1e-10)
    theta = u1_links_with_plaquettes(plaq, g)
    assert theta.shape == (n, 2, *shape) and bool(((theta > -math.pi) & (theta <= math.pi)).all())
    got = u1_plaquette_angles(theta)[:, 0]
    assert torch.allclose(wrap_angle(got - plaq), torch.zeros_like(plaq), atol=1e-12)
    assert torch.equal(topological_charge(theta).round(), q.round())
    assert len(set(q.round().tolist())) >= 3  # several sectors: the check is not vacuous
    # Polyakov loops in both directions are uniform phases given the plaquettes, E exp(i P) = 0, and
    # the gauge is random: single links are uniform as well (variance 1/2 each; 5 z-scores, |z| < 4)
    z = {}
    for axis in (0, 1):
        loop = theta[:, axis].sum(dim=1 + axis)[:, 0]  # the loop along `axis` through the origin
        z[f"cos polyakov_{axis}"] = torch.cos(loop).mean().item() * math.sqrt(2 * n)
        z[f"sin polyakov_{axis}"] = torch.sin(loop).mean().item() * math.sqrt(2 * n)
    z["cos link"] = torch.cos(theta[:, 0, 0, 0]).mean().item() * math.sqrt(2 * n)
    for name, value in z.items():
        record_z(name, value, 4.0)
    assert all(abs(v) < 4 for v in z.values()), z
    with pytest.raises(ValueError):
        u1_links_with_plaquettes(plaq[0], g)
    with pytest.raises(ValueError):
        sample_plaquettes_2d(-1.0, shape, 2, g)


@pytest.mark.statistical
@pytest.mark.parametrize("beta, shape", [(1.0, (4, 4)), (3.0, (8, 4)), (6.0, (8, 8))])
def test_exact_sampler_reproduces_torus_values(beta: float, shape: tuple[int, int], record_z) -> None:
    """Independent exact draws against the exact plaquette, Wilson loops and <Q^2> (|z| < 3 each)."""
    n = 6000
    theta = sample_exact_2d(beta, shape, n, gen(stat_seed(31 + int(beta))))
    assert theta.shape == (n, 2, *shape) and theta.dtype == F64
    obs = U1GaugeAction(U1Params(beta), Lattice(shape)).observables(theta)
    assert torch.allclose(obs["topological_charge"], obs["topological_charge"].round(), atol=1e-10)
    expected = {
        "plaquette": exact_plaquette(beta, shape),
        "wilson_loop_1x2": exact_wilson_loop(beta, shape, 2),
        "wilson_loop_2x2": exact_wilson_loop(beta, shape, 4),
        "topological_charge_sq": exact_q2(beta, shape),
        "topological_charge": 0.0,
        "polyakov_loop": 0.0,
    }
    z = {}
    for name, exact in expected.items():
        v = obs[name].numpy()
        z[name] = (v.mean() - exact) / (v.std(ddof=1) / math.sqrt(n))  # independent draws
        record_z(name, z[name])
    assert all(abs(v) < 3 for v in z.values()), z
    # power: a <Q^2> 25% off (about 10 errors) is excluded at beta = 6
    if beta == 6.0:
        q2 = obs["topological_charge_sq"].numpy()
        assert abs(q2.mean() - 1.25 * exact_q2(beta, shape)) > 3 * q2.std() / math.sqrt(n)


# --- theory and registry -------------------------------------------------------------


def test_theory_contract_and_registry() -> None:
    assert "u1" in REGISTRY
    spec = get_spec("u1")
    assert spec.params is U1Params
    theory = spec.build(U1Params(beta=2.0), Lattice((6, 4)))
    assert isinstance(theory, U1GaugeAction)
    assert theory.name == "u1" and theory.field_name == "links"
    assert theory.field_shape == (2, 6, 4)
    assert theory.couplings() == {"beta": 2.0}
    theta = haar((6, 4), 5, seed=16)
    obs = theory.observables(theta)
    expected = {
        "action",
        "plaquette",
        "wilson_loop_1x1",
        "wilson_loop_1x2",
        "wilson_loop_2x2",
        "polyakov_loop",
        "polyakov_loop_abs",
        "topological_charge",
        "topological_charge_sq",
    }
    assert set(obs) == expected
    for value in obs.values():
        assert value.shape == (5,) and value.dtype == F64
    assert torch.allclose(obs["action"], theory.action(theta))
    assert torch.allclose(obs["plaquette"], -theory.action(theta) / (2.0 * 24))
    assert torch.allclose(obs["wilson_loop_1x1"], obs["plaquette"])
    assert torch.allclose(obs["topological_charge_sq"], obs["topological_charge"] ** 2)
    poly = u1_polyakov_loop(theta).flatten(1).mean(1)
    assert torch.allclose(obs["polyakov_loop"], poly.real) and torch.allclose(obs["polyakov_loop_abs"], poly.abs())
    derived = theory.derived_observables()
    assert set(derived) == {"topological_susceptibility"}
    assert derived["topological_susceptibility"].inputs == ("topological_charge_sq",)
    assert derived["topological_susceptibility"].func(4.8) == pytest.approx(0.2)
    assert torch.equal(theory.project(theta + 2 * math.pi), wrap_angle(theta + 2 * math.pi))

    theory3 = spec.build(U1Params(beta=1.0), Lattice((3, 4, 5)))
    assert theory3.field_shape == (3, 3, 4, 5)
    obs3 = theory3.observables(haar((3, 4, 5), 2, seed=17))
    assert "topological_charge" not in obs3 and theory3.derived_observables() == {}
    assert {"action", "plaquette", "wilson_loop_2x2", "polyakov_loop"} <= set(obs3)
    with pytest.raises(ValueError):
        spec.build(U1Params(beta=1.0), Lattice((8,)))
    with pytest.raises(ValueError):
        U1Params(beta=float("nan"))


# --- HMC against the exact torus results -----------------------------------------------


@pytest.mark.statistical
def test_hmc_reproduces_exact_torus_values(record_z) -> None:
    """64 batched Omelyan-HMC chains on 6x6 at beta = 2 from a hot start; every z-score within 3 sigma.

    Here topology moves (tau_int(Q^2) of a few trajectories), so 60 trajectories thermalise a hot
    start and the Gamma method over the chains as replicas gives honest errors.
    """
    shape, beta, n_chains, n_traj = (6, 6), 2.0, 64, 300
    theory = U1GaugeAction(U1Params(beta), Lattice(shape))
    g = gen(stat_seed(2024))
    x0, _ = UniformU1Prior(theory.lattice, dtype=F64).sample(n_chains, g)
    hmc = HMC(
        theory.action,
        x0,
        step_size=0.25,
        n_steps=4,
        generator=g,
        integrator="omelyan",
        force=theory.force,
        project=wrap_angle,
        step_jitter=0.2,
    )
    hmc.run(60)  # thermalisation from a hot start
    block = hmc.run(n_traj)
    assert block.accepted.float().mean() > 0.9
    obs = theory.observables(block.x)

    def chains(name: str) -> list[np.ndarray]:
        v = obs[name].numpy().reshape(n_traj, n_chains)
        return [v[:, c] for c in range(n_chains)]

    expected = {
        "plaquette": exact_plaquette(beta, shape),
        "wilson_loop_1x2": exact_wilson_loop(beta, shape, 2),
        "wilson_loop_2x2": exact_wilson_loop(beta, shape, 4),
        "topological_charge_sq": exact_q2(beta, shape),
    }
    z = {}
    for name, exact in expected.items():
        res = gamma_method(chains(name))
        z[name] = (res.mean - exact) / res.err
    for name in ("topological_charge", "polyakov_loop"):  # exactly zero (parity, center symmetry)
        res = gamma_method(chains(name), known_mean=0.0)
        z[name] = res.mean / res.err
    for name, value in z.items():
        record_z(name, value)
    assert all(abs(v) < 3 for v in z.values()), z


# --- exactness at several couplings and volumes -------------------------------------------
#
# At beta = 6 on 8x8 the geometric charge of HMC hardly ever changes (tau_int(Q^2) of thousands of
# trajectories: over 90% of the chains below never change Q). Chains from a hot start then carry
# the topology of the start, and a Gamma-method window capped at N/2 cannot see it. So every chain
# starts from an exact independent sample of the torus (theories.u1.sample_exact_2d): the chain is
# in equilibrium from its first trajectory, each chain mean is an independent unbiased estimate, and
# the error comes from the spread of the chain means, whatever the autocorrelation time.


def _hmc_from_exact_starts(
    shape: tuple[int, int], beta: float, seed: int, n_chains: int, n_traj: int
) -> tuple[dict[str, np.ndarray], float]:
    """``n_chains`` Omelyan-HMC chains of ``n_traj`` trajectories from exact starts.

    The step size is tuned (to 90% acceptance) on separate chains, so that the measured chains run
    a fixed kernel. Returns the observables ``[n_traj, n_chains]`` and the acceptance.
    """
    theory = U1GaugeAction(U1Params(beta), Lattice(shape))
    g = gen(seed)

    def hmc(x0: torch.Tensor, step_size: float, n_steps: int) -> HMC:
        return HMC(
            theory.action,
            x0,
            step_size=step_size,
            n_steps=n_steps,
            generator=g,
            integrator="omelyan",
            force=theory.force,
            project=wrap_angle,
            step_jitter=0.2,
        )

    tuner = hmc(sample_exact_2d(beta, shape, 64, g), 0.25, 4)
    tuner.tune(30, target_acceptance=0.9)
    block = hmc(sample_exact_2d(beta, shape, n_chains, g), tuner.step_size, tuner.n_steps).run(n_traj)
    obs = theory.observables(block.x)
    return {k: v.numpy().reshape(n_traj, n_chains) for k, v in obs.items()}, block.accepted.double().mean().item()


@pytest.mark.statistical
@pytest.mark.parametrize("shape", [(4, 4), (8, 8)])
@pytest.mark.parametrize("beta", [1.0, 3.0, 6.0])
def test_hmc_reproduces_exact_plaquette_and_q2(shape: tuple[int, int], beta: float, record_z) -> None:
    """Batched Omelyan HMC at three couplings and two volumes: |z| < 3 for the plaquette and <Q^2>.

    256 chains of 100 trajectories from exact starts; errors from the spread of the chain means
    (255 degrees of freedom). The plaquette is also checked with Gamma-method errors over the
    chains as replicas, whose window must close below its cap N/2 (tau_int(plaquette) ~ 2-5).
    """
    n_chains, n_traj = 256, 100
    obs, acceptance = _hmc_from_exact_starts(shape, beta, stat_seed(int(100 * beta) + shape[0]), n_chains, n_traj)
    assert acceptance > 0.6, acceptance  # tuned for 0.9 on 30 trajectories
    expected = {"plaquette": exact_plaquette(beta, shape), "topological_charge_sq": exact_q2(beta, shape)}
    if n_chains * expected["topological_charge_sq"] < 10:
        # 4x4 at beta = 6: <Q^2> = 0.0027, so only ~1 of the 256 exact starts has Q != 0 and the
        # spread of the chain means is no Gaussian error (often exactly zero); nothing to test there
        del expected["topological_charge_sq"]
    z = {}
    for name, exact in expected.items():
        means = obs[name].mean(axis=0)
        z[name] = (means.mean() - exact) / (means.std(ddof=1) / math.sqrt(n_chains))
    res = gamma_method(list(obs["plaquette"].T))
    assert res.window < n_traj // 2, res  # the window closed before its cap
    z["plaquette (Gamma method)"] = (res.mean - exact_plaquette(beta, shape)) / res.err
    for name, value in z.items():
        record_z(name, value)
    assert all(abs(v) < 3 for v in z.values()), z
