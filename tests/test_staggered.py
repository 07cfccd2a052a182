"""Tests of latflow.fermions.staggered: the staggered Dirac operator with an optional Yukawa mass term.

The operator is checked against a dense matrix built independently, site by site, from

    D_xy = (m + g sigma_x) delta_xy
           + 1/2 sum_mu eta_mu(x) [ U_mu(x) delta_{x+mu, y} - U_mu(x-mu)^dagger delta_{x-mu, y} ],
    eta_mu(x) = (-1)^(x_0 + ... + x_{mu-1}),

with a factor -1 on hops across the time boundary (axis 0) for antiperiodic time; against the free
spectrum ``m^2 + sum_mu sin^2 p_mu`` of ``D^dagger D``; through the epsilon symmetry, the even/odd
structure, gauge covariance, the derivatives in sigma and the pseudofermion estimators.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import stat_seed

from latflow.fermions import u1_links
from latflow.fermions.dense import dense_matrix
from latflow.fermions.staggered import (
    StaggeredDirac,
    StaggeredPseudofermions,
    epsilon,
    free_logdet_normal,
    free_normal_spectrum,
)
from latflow.lattice import Lattice
from latflow.sun import haar_sun, sun_gauge_transform

F64, C128 = torch.float64, torch.complex128


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_sigma(batch: int, shape: tuple[int, ...], g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Real scalar background ``[B, *L]``."""
    return scale * torch.randn((batch, *shape), generator=g, dtype=F64)


def random_u1(batch: int, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random U(1) links ``[B, d, *L]`` (complex)."""
    theta = math.pi * (2 * torch.rand((batch, len(shape), *shape), generator=g, dtype=F64) - 1)
    return u1_links(theta)


def random_su3(batch: int, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Haar-random SU(3) links ``[B, d, *L, 3, 3]``."""
    return haar_sun((batch, len(shape), *shape), 3, g)


def random_spinor(batch: int, field_shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randn((batch, *field_shape), generator=g, dtype=C128)


def reference_dense(
    shape: tuple[int, ...],
    site_mass: np.ndarray,
    links: np.ndarray | None,
    n_colors: int,
    antiperiodic_time: bool,
) -> np.ndarray:
    """Dense staggered ``D`` ``[V N, V N]`` of one configuration, built site by site.

    Parameters
    ----------
    shape
        Lattice extents ``(L0, ..., L{d-1})``.
    site_mass
        Real ``m + g sigma`` ``[*L]``.
    links
        ``None`` (``U = 1``), U(1) links ``[d, *L]`` or SU(N) links ``[d, *L, N, N]``.
    n_colors
        1 without links or for U(1), ``N`` for SU(N).
    antiperiodic_time
        Factor -1 on hops across the boundary of axis 0.
    """
    d, nc = len(shape), n_colors
    sites = list(np.ndindex(*shape))
    index = {x: i for i, x in enumerate(sites)}
    out = np.zeros((len(sites) * nc, len(sites) * nc), dtype=np.complex128)

    def link(mu: int, x: tuple[int, ...]) -> np.ndarray:
        if links is None:
            return np.eye(nc)
        u = links[(mu, *x)]
        return np.asarray(u).reshape(nc, nc)

    for x in sites:
        i = index[x]
        out[i * nc : (i + 1) * nc, i * nc : (i + 1) * nc] += site_mass[x] * np.eye(nc)
        for mu in range(d):
            eta = (-1) ** sum(x[:mu])
            xp, xm = list(x), list(x)
            xp[mu] = (x[mu] + 1) % shape[mu]
            xm[mu] = (x[mu] - 1) % shape[mu]
            xp, xm = tuple(xp), tuple(xm)
            bc_f = -1.0 if (antiperiodic_time and mu == 0 and x[0] == shape[0] - 1) else 1.0
            bc_b = -1.0 if (antiperiodic_time and mu == 0 and x[0] == 0) else 1.0
            j, k = index[xp], index[xm]
            out[i * nc : (i + 1) * nc, j * nc : (j + 1) * nc] += 0.5 * eta * bc_f * link(mu, x)
            out[i * nc : (i + 1) * nc, k * nc : (k + 1) * nc] -= 0.5 * eta * bc_b * link(mu, xm).conj().T
    return out


def columns_of_apply(apply, x, field_shape: tuple[int, ...], batch: int) -> torch.Tensor:
    """Dense matrix ``[B, n, n]`` of ``psi -> apply(x, psi)`` from unit vectors, one configuration at a time."""
    n = int(np.prod(field_shape))
    mats = []
    for b in range(batch):
        if isinstance(x, tuple):
            xb = tuple(t[b : b + 1].expand(n, *t.shape[1:]) for t in x)
        else:
            xb = x[b : b + 1].expand(n, *x.shape[1:])
        eye = torch.eye(n, dtype=C128).reshape(n, *field_shape)
        mats.append(apply(xb, eye).reshape(n, n).T)
    return torch.stack(mats)


# (name, shape, mass, yukawa, n_colors, antiperiodic_time)
CASES = [
    ("scalar-2d", (4, 6), 0.3, 0.7, None, True),
    ("scalar-3d", (4, 4, 2), -0.2, 1.1, None, True),
    ("u1", (4, 4), 0.25, 0.0, 1, True),
    ("u1-yukawa", (4, 2), 0.1, 0.6, 1, True),
    ("su3", (2, 4), 0.4, 0.0, 3, True),
    ("su3-yukawa", (2, 2), 0.2, 0.8, 3, True),
    ("scalar-periodic", (4, 4), 0.15, 0.5, None, False),
    ("u1-periodic", (2, 4, 2), 0.3, 0.0, 1, False),
]
CASE_IDS = [c[0] for c in CASES]


def make_case(case, batch: int, seed: int):
    """``(dirac, background x, sigma or None, links or None)`` of one test case."""
    _, shape, mass, yukawa, n_colors, apbc = case
    g = gen(seed)
    dirac = StaggeredDirac(Lattice(shape), mass, yukawa, n_colors=n_colors, antiperiodic_time=apbc)
    sigma = random_sigma(batch, shape, g)
    links = None
    if n_colors == 1:
        links = random_u1(batch, shape, g)
    elif n_colors is not None:
        links = random_su3(batch, shape, g)
    if links is None:
        x = sigma
    elif yukawa != 0.0:
        x = (links, sigma)
    else:
        x = links
    return dirac, x, sigma, links


def reference_for(case, dirac, sigma, links, b: int) -> torch.Tensor:
    _, shape, mass, yukawa, n_colors, apbc = case
    site_mass = mass + (yukawa * sigma[b].numpy() if (yukawa != 0.0 or links is None) else 0.0 * sigma[b].numpy())
    lk = None if links is None else links[b].numpy()
    return torch.from_numpy(reference_dense(shape, site_mass, lk, n_colors or 1, apbc))


def eps_diag(dirac: StaggeredDirac) -> torch.Tensor:
    """``diag(epsilon)`` over the field's entries ``[n, n]`` (colour included)."""
    e = epsilon(tuple(dirac.lattice.shape))
    e = e.reshape(*e.shape, *([1] * (len(dirac.field_shape) - e.dim()))).expand(dirac.field_shape)
    return torch.diag(e.reshape(-1)).to(C128)


# ---------------------------------------------------------------------------------------------
# 1. against the independent site-loop matrix


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_apply_matches_site_loop_matrix(case):
    batch = 2
    dirac, x, sigma, links = make_case(case, batch, 11)
    got = columns_of_apply(dirac.apply, x, dirac.field_shape, batch)
    for b in range(batch):
        ref = reference_for(case, dirac, sigma, links, b)
        assert ref.abs().max() > 0.1
        torch.testing.assert_close(got[b], ref, rtol=0, atol=1e-13)
    # the hopping term really connects sites: not just the diagonal
    assert (got[0] - torch.diag(torch.diagonal(got[0]))).abs().max() > 0.4


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dense_matches_site_loop_matrix(case):
    batch = 2
    dirac, x, sigma, links = make_case(case, batch, 12)
    dense = dirac.dense(x)
    assert dense.shape == (batch, int(np.prod(dirac.field_shape)), int(np.prod(dirac.field_shape)))
    for b in range(batch):
        ref = reference_for(case, dirac, sigma, links, b)
        torch.testing.assert_close(dense[b].to(C128), ref, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# 2. adjointness


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dagger_is_adjoint_and_normal(case):
    batch = 3
    dirac, x, _, _ = make_case(case, batch, 21)
    g = gen(22)
    a = random_spinor(batch, dirac.field_shape, g)
    b = random_spinor(batch, dirac.field_shape, g)
    lhs = (a.conj() * dirac.apply(x, b)).flatten(1).sum(1)
    rhs = (dirac.apply_dagger(x, a).conj() * b).flatten(1).sum(1)
    assert lhs.abs().min() > 1e-2
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dirac.apply_normal(x, b), dirac.apply_dagger(x, dirac.apply(x, b)), rtol=0, atol=0)
    # D^dag D is Hermitian positive
    q = (b.conj() * dirac.apply_normal(x, b)).flatten(1).sum(1)
    assert q.imag.abs().max() < 1e-10 and q.real.min() > 0


# ---------------------------------------------------------------------------------------------
# 3. free spectrum


@pytest.mark.parametrize(
    "shape, mass",
    [((4, 6), 0.0), ((4, 6), 0.3), ((4, 4, 2), 0.5), ((6,), 0.2), ((2, 2), 0.0), ((2, 4, 4), 0.0)],
)
def test_free_spectrum_closed_form(shape, mass):
    dirac = StaggeredDirac(Lattice(shape), mass)  # yukawa = 0: sigma is ignored
    sigma = random_sigma(1, shape, gen(31))
    dense = dirac.dense(sigma)[0]
    ev = torch.linalg.eigvalsh(dense.T @ dense).numpy()
    exact = np.sort(free_normal_spectrum(shape, mass).reshape(-1))
    np.testing.assert_allclose(ev, exact, rtol=0, atol=1e-12)
    ld = dirac.logdet_normal(sigma)
    assert abs(float(ld[0]) - free_logdet_normal(shape, mass)) < 1e-10
    # also with a Yukawa coupling and sigma = 0
    dy = StaggeredDirac(Lattice(shape), mass, 0.9)
    assert abs(float(dy.logdet_normal(torch.zeros(1, *shape, dtype=F64))[0]) - free_logdet_normal(shape, mass)) < 1e-10


@pytest.mark.parametrize("shape, mass", [((4, 6), 0.0), ((4, 4, 2), 0.3)])
def test_free_spectrum_periodic_time(shape, mass):
    dirac = StaggeredDirac(Lattice(shape), mass, antiperiodic_time=False)
    dense = dirac.dense(torch.zeros(1, *shape, dtype=F64))[0]
    ev = torch.linalg.eigvalsh(dense.T @ dense).numpy()
    exact = np.sort(free_normal_spectrum(shape, mass, antiperiodic_time=False).reshape(-1))
    np.testing.assert_allclose(ev, exact, rtol=0, atol=1e-12)
    if mass == 0.0:  # zero mode at p = 0: singular operator
        assert abs(ev[0]) < 1e-12 and exact[0] == 0.0
    else:
        assert abs(float(dirac.logdet_normal(torch.zeros(1, *shape, dtype=F64))[0])
                   - free_logdet_normal(shape, mass, antiperiodic_time=False)) < 1e-10  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 4. epsilon symmetry and the sign of det D


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_epsilon_symmetry(case):
    dirac, x, sigma, links = make_case(case, 1, 41)
    dense = reference_for(case, dirac, sigma, links, 0)
    hop = columns_of_apply(dirac.hop, x, dirac.field_shape, 1)[0]
    eps = eps_diag(dirac)
    torch.testing.assert_close(eps @ hop @ eps, -hop, rtol=0, atol=1e-14)  # {eps, D_st} = 0
    torch.testing.assert_close(hop.conj().T, -hop, rtol=0, atol=1e-14)  # anti-Hermitian
    torch.testing.assert_close(dense.conj().T, eps @ dense @ eps, rtol=0, atol=1e-14)
    det = torch.linalg.det(dense)
    assert abs(det.imag) < 1e-10 * max(1.0, abs(det.real))  # det D is real


@pytest.mark.parametrize("case", [c for c in CASES if c[3] != 0.0], ids=[c[0] for c in CASES if c[3] != 0.0])
def test_massless_sigma_reflection(case):
    """At ``m = 0``: ``D(-sigma) = -eps D(sigma) eps``."""
    _, shape, _, yukawa, n_colors, apbc = case
    dirac = StaggeredDirac(Lattice(shape), 0.0, yukawa, n_colors=n_colors, antiperiodic_time=apbc)
    _, x, sigma, links = make_case(case, 1, 42)
    x_minus = -sigma if links is None else (links, -sigma)
    d_plus = columns_of_apply(dirac.apply, x, dirac.field_shape, 1)[0]
    d_minus = columns_of_apply(dirac.apply, x_minus, dirac.field_shape, 1)[0]
    eps = eps_diag(dirac)
    assert (d_plus - d_minus).abs().max() > 0.1
    torch.testing.assert_close(d_minus, -eps @ d_plus @ eps, rtol=0, atol=1e-14)


@pytest.mark.parametrize("shape", [(2, 2), (4, 4)])
def test_det_can_be_negative(shape):
    """A seeded search finds a sigma with ``det D < 0``; ``sign_det`` says -1 and ``det(D)^2 = det(D^dag D)``."""
    dirac = StaggeredDirac(Lattice(shape), 0.0, 3.0)
    sigma = random_sigma(64, shape, gen(43))
    dense = dirac.dense(sigma)
    det = torch.linalg.det(dense)
    neg = torch.nonzero(det < 0).flatten()
    pos = torch.nonzero(det > 0).flatten()
    assert neg.numel() > 0 and pos.numel() > 0
    sign = dirac.sign_det(sigma)
    torch.testing.assert_close(sign, torch.sign(det), rtol=0, atol=0)
    i = int(neg[0])
    assert float(sign[i]) == -1.0
    det_normal = torch.linalg.det(dense[i].T @ dense[i])
    assert det_normal > 0
    torch.testing.assert_close(det[i] ** 2, det_normal, rtol=1e-10, atol=0)
    torch.testing.assert_close(dirac.logdet_normal(sigma)[i], torch.log(det_normal), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# 5. even/odd


@pytest.mark.parametrize("n_colors, shape", [(None, (4, 6)), (None, (4, 4, 2)), (1, (4, 4)), (3, (2, 4))])
def test_even_odd(n_colors, shape):
    mass = 0.35
    dirac = StaggeredDirac(Lattice(shape), mass, n_colors=n_colors)
    g = gen(51)
    if n_colors is None:
        x = random_sigma(2, shape, g)
    elif n_colors == 1:
        x = random_u1(2, shape, g)
    else:
        x = random_su3(2, shape, g)
    normal = columns_of_apply(dirac.apply_normal, x, dirac.field_shape, 2)
    even = dirac.even_mask
    full = even.reshape(*even.shape, *([1] * (len(dirac.field_shape) - even.dim()))).expand(dirac.field_shape)
    e_idx = torch.nonzero(full.reshape(-1)).flatten()
    o_idx = torch.nonzero(~full.reshape(-1)).flatten()
    assert normal[:, e_idx][:, :, o_idx].abs().max() < 1e-14  # no even-odd block
    assert normal[:, o_idx][:, :, e_idx].abs().max() < 1e-14
    m_even = dense_matrix(dirac.apply_even_normal, x, dirac.field_shape, mask=even)
    assert m_even.shape[-1] == e_idx.numel()
    torch.testing.assert_close(m_even, normal[:, e_idx][:, :, e_idx], rtol=0, atol=1e-13)
    ld_even = torch.linalg.slogdet(m_even)[1]
    ld_full = torch.linalg.slogdet(columns_of_apply(dirac.apply, x, dirac.field_shape, 2))[1]
    torch.testing.assert_close(ld_even, ld_full, rtol=0, atol=1e-10)
    torch.testing.assert_close(dirac.logdet(x), ld_full, rtol=0, atol=1e-10)


def test_even_odd_refuses_yukawa():
    dirac = StaggeredDirac(Lattice((4, 4)), 0.3, 0.5)
    sigma = random_sigma(1, (4, 4), gen(52))
    with pytest.raises(ValueError, match="uniform mass"):
        dirac.apply_even_normal(sigma, torch.zeros(1, 4, 4, dtype=C128))


# ---------------------------------------------------------------------------------------------
# 6. gauge covariance


@pytest.mark.parametrize("n_colors, shape", [(1, (4, 4)), (1, (4, 2, 2)), (3, (2, 4))])
def test_gauge_covariance(n_colors, shape):
    dirac = StaggeredDirac(Lattice(shape), 0.2, n_colors=n_colors)
    g = gen(61)
    d = len(shape)
    if n_colors == 1:
        links = random_u1(2, shape, g)
        omega = u1_links(math.pi * (2 * torch.rand((2, *shape), generator=g, dtype=F64) - 1))
        links_t = torch.stack(
            [omega * links[:, mu] * torch.roll(omega, -1, dims=1 + mu).conj() for mu in range(d)], dim=1
        )
    else:
        links = random_su3(2, shape, g)
        links_t = sun_gauge_transform(links, haar_sun((2, *shape), 3, g))
    assert (links_t - links).abs().max() > 0.1
    dense, dense_t = dirac.dense(links), dirac.dense(links_t)
    det, det_t = torch.linalg.det(dense), torch.linalg.det(dense_t)
    torch.testing.assert_close(det_t, det, rtol=1e-10, atol=0)
    ev = torch.linalg.eigvalsh(dense.conj().transpose(-1, -2) @ dense)
    ev_t = torch.linalg.eigvalsh(dense_t.conj().transpose(-1, -2) @ dense_t)
    torch.testing.assert_close(ev_t, ev, rtol=0, atol=1e-12)
    # the spectrum is not the free one: the links matter
    free = torch.as_tensor(np.sort(free_normal_spectrum(shape, 0.2).reshape(-1)), dtype=F64)
    assert (ev[0] - free.repeat_interleave(n_colors)).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# 7. derivatives


def test_logdet_gradient_in_sigma():
    shape = (4, 4)
    g_yuk = 0.8
    dirac = StaggeredDirac(Lattice(shape), 0.3, g_yuk)
    sigma = random_sigma(2, shape, gen(71)).requires_grad_(True)
    dirac.logdet_normal(sigma).sum().backward()
    grad = sigma.grad
    with torch.no_grad():
        inv = torch.linalg.inv(dirac.dense(sigma))
        exact = 2 * g_yuk * torch.diagonal(inv, dim1=-2, dim2=-1).reshape(2, *shape)
    torch.testing.assert_close(grad, exact, rtol=0, atol=1e-11)
    h = 1e-5
    with torch.no_grad():
        for site in [(0, 0), (1, 2), (3, 3)]:
            sp, sm = sigma.detach().clone(), sigma.detach().clone()
            sp[(slice(None), *site)] += h
            sm[(slice(None), *site)] -= h
            fd = (dirac.logdet_normal(sp) - dirac.logdet_normal(sm)) / (2 * h)
            torch.testing.assert_close(fd, grad[(slice(None), *site)], rtol=0, atol=1e-7)


def test_pseudofermion_force_and_heatbath():
    shape = (4, 4)
    dirac = StaggeredDirac(Lattice(shape), 0.4, 0.9)
    pf = StaggeredPseudofermions(dirac, tol=1e-13)
    sigma = random_sigma(3, shape, gen(72), scale=0.5)
    phis, s0 = pf.heatbath(sigma, gen(73))
    assert phis[0].shape == (3, *shape) and phis[0].dtype == C128
    torch.testing.assert_close(pf.action(sigma, phis), s0, rtol=1e-9, atol=0)  # S = |chi|^2
    force = pf.force(sigma, phis)
    assert force.shape == sigma.shape and force.dtype == F64
    assert force.abs().max() > 1e-2
    h = 1e-5
    for site in itertools.product(range(4), range(4)):
        sp, sm = sigma.clone(), sigma.clone()
        sp[(slice(None), *site)] += h
        sm[(slice(None), *site)] -= h
        fd = (pf.action(sp, phis) - pf.action(sm, phis)) / (2 * h)
        torch.testing.assert_close(fd, force[(slice(None), *site)], rtol=1e-6, atol=1e-7)
    # the action equals phi^dag (D^dag D)^-1 phi from the dense matrix
    dense = dirac.dense(sigma).to(C128)
    k = dense.conj().transpose(-1, -2) @ dense
    phi = phis[0].reshape(3, -1)
    exact = (phi.conj() * torch.linalg.solve(k, phi.unsqueeze(-1)).squeeze(-1)).sum(-1).real
    torch.testing.assert_close(s0, exact, rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------
# 8. statistical


def z_of(samples: torch.Tensor, exact: float) -> float:
    mean = float(samples.mean())
    err = float(samples.std()) / math.sqrt(samples.numel())
    return (mean - exact) / err


@pytest.mark.statistical
def test_heatbath_action_mean_is_volume(record_z):
    """``E_chi[phi^dag K^{-1} phi] = V`` with ``phi = D^dag chi``, by CG (not from the returned |chi|^2)."""
    shape = (4, 4)
    dirac = StaggeredDirac(Lattice(shape), 0.3, 1.0)
    pf = StaggeredPseudofermions(dirac, tol=1e-12)
    b = 2000
    sigma = random_sigma(1, shape, gen(81)).expand(b, *shape).contiguous()
    phis, s0 = pf.heatbath(sigma, gen(stat_seed(82)))
    s = pf.action(sigma, phis)
    torch.testing.assert_close(s, s0, rtol=1e-8, atol=0)
    z = z_of(s, 16.0)
    record_z("<S_pf> = V", z, 3.0)
    assert abs(z) < 3, z


@pytest.mark.statistical
def test_pseudofermion_determinant_ratio(record_z):
    """``E_{phi ~ heatbath(sigma_1)}[exp(-(S(sigma_2) - S(sigma_1)))] = det K_2 / det K_1``, ``K = D^dag D``."""
    shape = (4, 4)
    dirac = StaggeredDirac(Lattice(shape), 0.5, 1.0)
    pf = StaggeredPseudofermions(dirac, tol=1e-12)
    g = gen(83)
    sigma1 = random_sigma(1, shape, g, scale=0.5)
    sigma2 = sigma1 + random_sigma(1, shape, g, scale=0.08)
    ld1, ld2 = dirac.logdet_normal(sigma1), dirac.logdet_normal(sigma2)
    exact = float(torch.exp(ld2 - ld1)[0])
    assert abs(exact - 1.0) > 0.05  # a non-trivial ratio
    # finite variance: 2 K_2^{-1} - K_1^{-1} positive definite
    d1, d2 = dirac.dense(sigma1)[0], dirac.dense(sigma2)[0]
    k1, k2 = d1.T @ d1, d2.T @ d2
    assert torch.linalg.eigvalsh(2 * torch.linalg.inv(k2) - torch.linalg.inv(k1)).min() > 0
    b = 4000
    s1 = sigma1.expand(b, *shape).contiguous()
    s2 = sigma2.expand(b, *shape).contiguous()
    phis, act1 = pf.heatbath(s1, gen(stat_seed(84)))
    w = torch.exp(-(pf.action(s2, phis) - act1))
    z = z_of(w, exact)
    record_z("det ratio", z, 3.0)
    assert abs(z) < 3, z


# ---------------------------------------------------------------------------------------------
# 9. bad input


def test_bad_input():
    lat = Lattice((4, 4))
    dirac = StaggeredDirac(lat, 0.1)
    sigma = torch.zeros(1, 4, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"spinor must be \[B, 4, 4\]"):
        dirac.apply(sigma, torch.zeros(1, 4, 2, dtype=C128))
    su3 = StaggeredDirac(lat, 0.1, n_colors=3)
    with pytest.raises(ValueError, match=r"spinor must be \[B, 4, 4, 3\]"):
        su3.apply(random_su3(1, (4, 4), gen(91)), torch.zeros(1, 4, 4, dtype=C128))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mass must be a finite real number"):
            StaggeredDirac(lat, bad)
        with pytest.raises(ValueError, match="yukawa must be a finite real number"):
            StaggeredDirac(lat, 0.1, bad)
    with pytest.raises(ValueError, match="n_colors must be None"):
        StaggeredDirac(lat, 0.1, n_colors=0)
    both = StaggeredDirac(lat, 0.1, 0.5, n_colors=1)
    links = random_u1(1, (4, 4), gen(92))
    with pytest.raises(ValueError, match=r"\(links, sigma\)"):
        both.apply(links, torch.zeros(1, 4, 4, dtype=C128))
    with pytest.raises(ValueError, match="scalar background"):
        StaggeredPseudofermions(both)
