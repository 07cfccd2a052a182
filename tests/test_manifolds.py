"""Field manifolds (latflow.manifolds) and HMC on them.

(a) Euclidean / U1Angles reproduce the real-field HMC bit for bit; (b) SU(N) molecular dynamics is
reversible, its energy violation scales like eps^2 (leapfrog) and <exp(-dH)> = 1 (Creutz); (c) SU(2)
HMC on a 2D 4x4 torus reproduces the exact plaquette from the character expansion; (d) the SU(N) force
matches finite differences of S along algebra directions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import stat_seed

from latflow.gauge import wrap_angle
from latflow.manifolds import MANIFOLDS, SUN, Euclidean, FieldManifold, U1Angles, manifold_for
from latflow.samplers import HMC
from latflow.sun import haar_sun, plaquette_mean, wilson_action


def _u1_action(theta: torch.Tensor, beta: float = 1.5) -> torch.Tensor:
    """2D U(1) Wilson action ``-beta sum cos(theta_p)`` for angles ``[B, 2, L, L]``."""
    p = theta[:, 0] + torch.roll(theta[:, 1], -1, 1) - torch.roll(theta[:, 0], -1, 2) - theta[:, 1]
    return -beta * torch.cos(p).sum((1, 2))


def _sun_links(b: int, n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Haar-random SU(N) links ``[b, d, *shape, N, N]`` complex128."""
    g = torch.Generator().manual_seed(seed)
    return haar_sun((b, len(shape), *shape), n, g)


def _run(hmc: HMC, n_traj: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, accs = [], []
    for _ in range(n_traj):
        acc, _ = hmc.trajectory()
        xs.append(hmc.x.clone())
        accs.append(acc)
    return torch.stack(xs), torch.stack(accs)


def test_registry_and_protocol() -> None:
    for name in MANIFOLDS:
        m = manifold_for(name)
        assert isinstance(m, FieldManifold)
        assert m.name == name
    assert manifold_for("sun", 4).name == "su4"
    with pytest.raises(ValueError):
        manifold_for("so3")


@pytest.mark.parametrize("integrator", ["leapfrog", "omelyan"])
def test_euclidean_and_u1_reproduce_plain_hmc_bit_for_bit(integrator: str) -> None:
    """HMC with the manifold given explicitly equals the default (real-field) HMC bit for bit."""
    x0 = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(step_size=0.15, n_steps=4, integrator=integrator, step_jitter=0.1)
    runs = {
        "plain": HMC(_u1_action, x0, generator=torch.Generator().manual_seed(2), project=wrap_angle, **kw),
        "u1": HMC(_u1_action, x0, generator=torch.Generator().manual_seed(2), manifold=U1Angles(), **kw),
        "u1+project": HMC(
            _u1_action, x0, generator=torch.Generator().manual_seed(2), manifold=U1Angles(), project=wrap_angle, **kw
        ),
    }
    out = {k: _run(h, 4) for k, h in runs.items()}
    for k in ("u1", "u1+project"):
        assert torch.equal(out[k][0], out["plain"][0]) and torch.equal(out[k][1], out["plain"][1])
    assert out["plain"][1].any() and (out["plain"][0].abs() <= math.pi).all()
    a = HMC(_u1_action, x0, generator=torch.Generator().manual_seed(3), **kw)
    b = HMC(_u1_action, x0, generator=torch.Generator().manual_seed(3), manifold=Euclidean(), **kw)
    assert torch.equal(_run(a, 3)[0], _run(b, 3)[0])
    assert b.project is None  # the Euclidean path does no extra work


@pytest.mark.parametrize("n", [2, 3])
def test_sun_force_matches_finite_differences(n: int) -> None:
    """d/dt S(exp(t Y) U)|_0 = 2 Re tr(Y^dagger F) for random Y in su(N), central differences."""
    u = _sun_links(3, n, (4, 4), seed=10 + n)
    beta = 2.0
    m = SUN(n)
    f = m.force(lambda x: wilson_action(x, beta), u)
    assert f.shape == u.shape
    # F is traceless anti-Hermitian
    assert torch.allclose(f, -f.transpose(-2, -1).conj(), atol=1e-13)
    assert torch.diagonal(f, dim1=-2, dim2=-1).sum(-1).abs().max() < 1e-13
    g = torch.Generator().manual_seed(20 + n)
    for _ in range(3):
        y = m.random_momenta(u, g)
        h = 1e-5
        sp = wilson_action(m.drift(u.clone(), y, h), beta)
        sm = wilson_action(m.drift(u.clone(), y, -h), beta)
        fd = (sp - sm) / (2 * h)
        an = 2 * (y.conj() * f).real.flatten(1).sum(1)
        assert torch.allclose(fd, an, rtol=1e-7, atol=1e-8), (fd, an)
    # single-link directions: the derivative along exp(t Y) on one link only
    y = torch.zeros_like(u)
    y[:, 1, 2, 3] = m.random_momenta(u[:, 1, 2, 3][:, None], g)[:, 0]
    sp = wilson_action(m.drift(u.clone(), y, 1e-5), beta)
    sm = wilson_action(m.drift(u.clone(), y, -1e-5), beta)
    an = 2 * (y[:, 1, 2, 3].conj() * f[:, 1, 2, 3]).real.sum((-2, -1))
    assert torch.allclose((sp - sm) / 2e-5, an, rtol=1e-7, atol=1e-8)


def test_su2_kinetic_normalisation_with_explicit_generators() -> None:
    """P = i sum_a p_a sigma_a / 2 has kinetic energy tr(P^dagger P) = (1/2) sum_a p_a^2."""
    sig = torch.tensor([[[0, 1], [1, 0]], [[0, -1j], [1j, 0]], [[1, 0], [0, -1]]], dtype=torch.complex128)
    pa = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    p = 1j * torch.einsum("bka,aij->bkij", pa.to(torch.complex128), sig / 2)
    assert torch.allclose(SUN(2).kinetic(p), 0.5 * pa.square().sum((1, 2)), rtol=1e-14)


@pytest.mark.statistical
@pytest.mark.parametrize("n", [2, 3])
def test_sun_momenta_have_density_exp_minus_kinetic(n: int, record_z) -> None:
    """Under exp(-K) with K = (1/2) sum_a p_a^2 over N^2 - 1 generators per link, K per link has
    mean (N^2 - 1)/2 and variance (N^2 - 1)/2 (a chi^2 / 2); the momenta are in su(N)."""
    m = SUN(n)
    u = _sun_links(4000, n, (1, 1), seed=1)[:, :1]
    p = m.random_momenta(u, torch.Generator().manual_seed(stat_seed(31 + n)))
    assert (
        torch.allclose(p, -p.transpose(-2, -1).conj())
        and torch.diagonal(p, dim1=-2, dim2=-1).sum(-1).abs().max() < 1e-14
    )
    k = m.kinetic(p).numpy()
    dim = n * n - 1
    z_mean = (k.mean() - dim / 2) / math.sqrt(dim / 2 / len(k))
    # error of the sample variance, sqrt((mu_4 - sigma^4) / n), with mu_4 - sigma^4 = (k^2 + 6 k) / 2 for chi^2_k / 2
    var_err = math.sqrt((dim**2 + 6 * dim) / 2 / len(k))
    z_var = (k.var(ddof=1) - dim / 2) / var_err
    record_z("mean K", z_mean)
    record_z("var K", z_var)
    assert abs(z_mean) < 3 and abs(z_var) < 3, (z_mean, z_var)


@pytest.mark.parametrize("n", [2, 3])
def test_sun_md_is_reversible(n: int) -> None:
    """Forward, flip momenta, back: recovers U and -P to 1e-10 (leapfrog and Omelyan)."""
    u = _sun_links(4, n, (4, 4), seed=40 + n)
    m = SUN(n)
    for integrator in ("leapfrog", "omelyan"):
        hmc = HMC(
            lambda x: wilson_action(x, 2.0),
            u,
            step_size=0.1,
            n_steps=10,
            generator=torch.Generator().manual_seed(5),
            integrator=integrator,
            manifold=m,
        )
        p0 = m.random_momenta(u, torch.Generator().manual_seed(6))
        u1, p1 = hmc._integrate(u, p0, 0.1, 10)
        assert (u1 - u).abs().max() > 0.1  # it moved
        u2, p2 = hmc._integrate(u1, -p1, 0.1, 10)
        assert (u2 - u).abs().max() < 1e-10 and (p2 + p0).abs().max() < 1e-10


@pytest.mark.parametrize("n", [2, 3])
def test_sun_leapfrog_energy_violation_scales_like_eps_squared(n: int) -> None:
    """Same trajectory length 1, eps = 0.1 and 0.05: |dH| drops by 4 (2nd-order integrator)."""
    u = _sun_links(16, n, (4, 4), seed=50 + n)
    m = SUN(n)
    hmc = HMC(lambda x: wilson_action(x, 2.0), u, step_size=0.1, n_steps=10, generator=torch.Generator(), manifold=m)
    p0 = m.random_momenta(u, torch.Generator().manual_seed(7))
    h0 = m.kinetic(p0) + hmc.s
    dh = []
    for eps, steps in ((0.1, 10), (0.05, 20), (0.025, 40)):
        u1, p1 = hmc._integrate(u, p0, eps, steps)
        dh.append((m.kinetic(p1) + wilson_action(u1, 2.0) - h0).abs().mean().item())
    assert 3.5 < dh[0] / dh[1] < 4.5 and 3.8 < dh[1] / dh[2] < 4.2, dh


def _su2_torus_plaquette(beta: float, volume: int) -> float:
    """Exact <Re tr P / 2> for SU(2) on a 2D torus of ``volume`` plaquettes, S = -(beta/2) sum Re tr P.

    Character expansion: Z = sum_r b_r^V with b_r = int dU exp((beta/2) tr U) chi_r(U) / d_r (Euler
    characteristic 0), so <Re tr P / 2> = (1/V) d ln Z / d beta = sum_r b_r^{V-1} b'_r / sum_r b_r^V.
    Class-function integrals with the SU(2) Haar measure (2/pi) sin^2(theta) d theta on [0, pi].
    """
    x, w = np.polynomial.legendre.leggauss(200)
    th = 0.5 * math.pi * (x + 1)
    w = 0.5 * math.pi * w * (2 / math.pi) * np.sin(th) ** 2
    boltz = np.exp(beta * np.cos(th))
    num = den = 0.0
    for d in range(1, 40):
        chi = np.sin(d * th) / np.sin(th) / d
        b = float(np.sum(w * boltz * chi))
        db = float(np.sum(w * np.cos(th) * boltz * chi))
        num += b ** (volume - 1) * db
        den += b**volume
    return num / den


@pytest.mark.statistical
def test_su2_hmc_plaquette_on_2d_torus_matches_character_expansion(record_z) -> None:
    """SU(2), beta = 2, 4x4 torus: <Re tr P>/2 from 32 HMC chains vs the exact character-expansion
    value (errors from the spread of chain means, which are independent)."""
    beta, b, n_burn, n_meas = 2.0, 32, 40, 160
    exact = _su2_torus_plaquette(beta, 16)
    gen = torch.Generator().manual_seed(stat_seed(61))
    u0 = haar_sun((b, 2, 4, 4), 2, gen)
    hmc = HMC(
        lambda x: wilson_action(x, beta),
        u0,
        step_size=0.25,
        n_steps=4,
        generator=gen,
        integrator="omelyan",
        manifold=SUN(2),
        step_jitter=0.2,
    )
    for _ in range(n_burn):
        hmc.trajectory()
    plaq = []
    for _ in range(n_meas):
        hmc.trajectory()
        plaq.append(plaquette_mean(hmc.x))
    plaq = torch.stack(plaq).mean(0).numpy()  # chain means [B]
    z_p = (plaq.mean() - exact) / (plaq.std(ddof=1) / math.sqrt(b))
    record_z("plaquette", z_p)
    assert abs(z_p) < 3, (plaq.mean(), exact, z_p)
    # the links stay in SU(2)
    eye = torch.eye(2, dtype=hmc.x.dtype)
    assert (hmc.x @ hmc.x.transpose(-2, -1).conj() - eye).abs().max() < 1e-12


@pytest.mark.statistical
@pytest.mark.parametrize("n", [2, 3])
def test_sun_hmc_creutz_equality(n: int, record_z) -> None:
    """SU(N), beta = 1.5 N, 2D 4x4: <exp(-dH)> = 1 within errors on equilibrated leapfrog trajectories
    (a coarse step, so that exp(-dH) fluctuates by O(10%))."""
    beta, b, n_burn, n_meas = 1.5 * n, 32, 20, 40
    gen = torch.Generator().manual_seed(stat_seed(71 + n))
    hmc = HMC(
        lambda x: wilson_action(x, beta),
        haar_sun((b, 2, 4, 4), n, gen),
        step_size=0.2,
        n_steps=5,
        generator=gen,
        manifold=SUN(n),
    )
    for _ in range(n_burn):
        hmc.trajectory()
    edh = torch.stack([torch.exp(-hmc.trajectory()[1]) for _ in range(n_meas)])
    m = edh.mean(0).numpy()
    z = (m.mean() - 1.0) / (m.std(ddof=1) / math.sqrt(b))
    record_z("exp(-dH)", z)
    assert abs(z) < 3, (m.mean(), z)
    assert edh.std() > 0.05
    det = torch.linalg.det(hmc.x)
    assert (det - 1).abs().max() < 1e-12
