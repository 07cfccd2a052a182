"""Tests of latflow.fermions: gamma matrices, the Wilson operator, even/odd, dense logdet, solvers.

The Wilson operator is checked against a dense matrix built independently, site by site, from
the formula

    D = 1 - kappa sum_mu [ (1 - gamma_mu) U_mu(x) delta_{x+mu, y} + (1 + gamma_mu) U_mu(x-mu)^dagger delta_{x-mu, y} ]

with a factor -1 on hops across the time boundary; against the free-field determinant in
momentum space (antiperiodic p_0); and through gauge covariance and gamma5-hermiticity.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import stat_seed

from latflow.fermions import (
    ConvergenceError,
    DiracOperator,
    EvenOddWilson,
    SolverResult,
    WilsonDirac,
    bicgstab,
    cg,
    cgnr,
    dense_matrix,
    gamma5,
    gamma_matrices,
    logdet,
    logdet_normal,
    spin_dim,
    u1_links,
)
from latflow.gauge import random_u1_gauge_transform, u1_gauge_transform
from latflow.lattice import Lattice

C128 = torch.complex128


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_theta(batch: int, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return math.pi * (2 * torch.rand((batch, len(shape), *shape), generator=g, dtype=torch.float64) - 1)


def random_u1(batch: int, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return u1_links(random_theta(batch, shape, g))


def random_sun(lead: tuple[int, ...], n: int, g: torch.Generator) -> torch.Tensor:
    """Haar-random SU(n) matrices ``[*lead, n, n]`` (QR of complex Gaussians, phases fixed)."""
    z = torch.randn((*lead, n, n), generator=g, dtype=C128)
    q, r = torch.linalg.qr(z)
    diag = torch.diagonal(r, dim1=-2, dim2=-1)
    q = q * (diag / diag.abs()).unsqueeze(-2)
    det = torch.linalg.det(q)
    return q * (det.conj() ** (1.0 / n) / det.abs() ** (1.0 / n))[..., None, None]


def random_spinor(op, batch: int, g: torch.Generator, dtype=C128) -> torch.Tensor:
    return torch.randn((batch, *op.field_shape), generator=g, dtype=dtype)


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.conj() * b).reshape(a.shape[0], -1).sum(1)


def reference_dense(
    U: torch.Tensor, kappa: float, shape: tuple[int, ...], gammas: np.ndarray, n_colors: int, antiperiodic: bool = True
) -> np.ndarray:
    """Wilson matrix of one configuration, by explicit loops over sites and directions.

    Index order (site row-major, spin, colour), as the field layout ``[*L, Ns(, N)]``.
    """
    u = U.numpy()
    d, ns, nc = len(shape), gammas.shape[1], n_colors
    vol = int(np.prod(shape))
    blk = ns * nc
    mat = np.eye(vol * blk, dtype=np.complex128)
    one = np.eye(ns)
    for x in itertools.product(*(range(n) for n in shape)):
        i = np.ravel_multi_index(x, shape)
        for mu in range(d):
            xp = list(x)
            xp[mu] = (x[mu] + 1) % shape[mu]
            xm = list(x)
            xm[mu] = (x[mu] - 1) % shape[mu]
            sign_p = -1.0 if (antiperiodic and mu == 0 and x[0] == shape[0] - 1) else 1.0
            sign_m = -1.0 if (antiperiodic and mu == 0 and x[0] == 0) else 1.0
            link_x = u[(mu, *x)] if nc > 1 else np.array([[u[(mu, *x)]]])
            link_xm = u[(mu, *xm)] if nc > 1 else np.array([[u[(mu, *xm)]]])
            jp = np.ravel_multi_index(tuple(xp), shape)
            jm = np.ravel_multi_index(tuple(xm), shape)
            mat[i * blk : (i + 1) * blk, jp * blk : (jp + 1) * blk] -= (
                kappa * sign_p * np.kron(one - gammas[mu], link_x)
            )
            mat[i * blk : (i + 1) * blk, jm * blk : (jm + 1) * blk] -= (
                kappa * sign_m * np.kron(one + gammas[mu], link_xm.conj().T)
            )
    return mat


def free_logdet(shape: tuple[int, ...], kappa: float, antiperiodic: bool = True, n_colors: int = 1) -> float:
    """log det D of the free Wilson operator (U = 1) from its momentum-space form.

    D(p) = a(p) + i sum_mu b_mu(p) gamma_mu with a = 1 - 2 kappa sum_mu cos p_mu and
    b_mu = 2 kappa sin p_mu, so D(p) has eigenvalues a +- i |b| (Ns / 2 times each) and
    det D = prod_p (a^2 + |b|^2)^(Ns N / 2); p_0 = 2 pi (n_0 + 1/2) / L_0 (antiperiodic),
    p_k = 2 pi n_k / L_k.
    """
    d = len(shape)
    total = 0.0
    for n in itertools.product(*(range(L) for L in shape)):
        p = [2 * math.pi * (n[mu] + (0.5 if (mu == 0 and antiperiodic) else 0.0)) / shape[mu] for mu in range(d)]
        a = 1 - 2 * kappa * sum(math.cos(q) for q in p)
        b2 = 4 * kappa**2 * sum(math.sin(q) ** 2 for q in p)
        total += math.log(a * a + b2)
    return total * spin_dim(d) * n_colors / 2


def assert_same_det(ld1: torch.Tensor, ld2: torch.Tensor, atol: float = 1e-10) -> None:
    """Complex log-determinants equal: real parts, and phases modulo 2 pi."""
    torch.testing.assert_close(ld1.real, ld2.real, rtol=0, atol=atol)
    torch.testing.assert_close(torch.exp(1j * ld1.imag), torch.exp(1j * ld2.imag), rtol=0, atol=atol)


# ---------------------------------------------------------------------------------- gamma matrices
@pytest.mark.parametrize("d", [2, 3, 4, 6])
def test_gamma_clifford_algebra(d):
    g = gamma_matrices(d)
    ns = spin_dim(d)
    assert g.shape == (d, ns, ns) and g.dtype == C128
    eye = torch.eye(ns, dtype=C128)
    for mu in range(d):
        torch.testing.assert_close(g[mu], g[mu].conj().T, rtol=0, atol=0)
        for nu in range(d):
            torch.testing.assert_close(g[mu] @ g[nu] + g[nu] @ g[mu], 2.0 * (mu == nu) * eye, rtol=0, atol=1e-15)
    if d % 2:
        with pytest.raises(ValueError, match="odd"):
            gamma5(d)
        return
    g5 = gamma5(d)
    torch.testing.assert_close(g5, g5.conj().T, rtol=0, atol=0)
    torch.testing.assert_close(g5 @ g5, eye, rtol=0, atol=1e-15)
    for mu in range(d):
        torch.testing.assert_close(g5 @ g[mu] + g[mu] @ g5, 0 * eye, rtol=0, atol=1e-15)


def test_gamma_conventions():
    g = gamma_matrices(2)
    torch.testing.assert_close(g[0], torch.tensor([[0, 1], [1, 0]], dtype=C128))
    torch.testing.assert_close(g[1], torch.tensor([[0, -1j], [1j, 0]], dtype=C128))
    torch.testing.assert_close(gamma5(2), torch.tensor([[1, 0], [0, -1]], dtype=C128))
    g4 = gamma_matrices(4)
    g5 = gamma5(4)
    torch.testing.assert_close(g5, g4[0] @ g4[1] @ g4[2] @ g4[3])
    torch.testing.assert_close(g5, torch.diag(torch.diagonal(g5)))  # chiral basis
    assert gamma_matrices(4, dtype=torch.complex64).dtype == torch.complex64


# ---------------------------------------------------------------------------------- Wilson operator
CASES = [
    ((4, 3), 1, 0.23),
    ((2, 2, 2, 2), 1, 0.12),
    ((3, 2), 3, 0.21),
]


def make_links(shape, n_colors, batch, g):
    if n_colors == 1:
        return random_u1(batch, shape, g)
    return random_sun((batch, len(shape), *shape), n_colors, g)


@pytest.mark.parametrize("shape,n_colors,kappa", CASES)
def test_wilson_matches_site_loop_reference(shape, n_colors, kappa):
    g = gen(11)
    op = WilsonDirac(Lattice(shape), kappa, n_colors=n_colors)
    U = make_links(shape, n_colors, 2, g)
    mat = dense_matrix(op.apply, U, op.field_shape)
    gammas = gamma_matrices(len(shape)).numpy()
    for b in range(2):
        ref = reference_dense(U[b], kappa, shape, gammas, n_colors)
        np.testing.assert_allclose(mat[b].numpy(), ref, rtol=0, atol=1e-14)
    # the boundary sign matters: periodic time gives another matrix, equal to its own reference
    per = WilsonDirac(Lattice(shape), kappa, n_colors=n_colors, antiperiodic_time=False)
    mat_p = dense_matrix(per.apply, U, per.field_shape)
    np.testing.assert_allclose(
        mat_p[0].numpy(), reference_dense(U[0], kappa, shape, gammas, n_colors, False), rtol=0, atol=1e-14
    )
    assert (mat_p - mat).abs().max() > 0.1
    # hop is (1 - D) / kappa
    psi = random_spinor(op, 2, g)
    torch.testing.assert_close(op.hop(U, psi), (psi - op.apply(U, psi)) / kappa, rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape,n_colors,kappa", CASES)
def test_gamma5_hermiticity_dense(shape, n_colors, kappa):
    g = gen(12)
    op = WilsonDirac(Lattice(shape), kappa, n_colors=n_colors)
    U = make_links(shape, n_colors, 1, g)
    m = dense_matrix(op.apply, U, op.field_shape)[0]
    m_dag = dense_matrix(op.apply_dagger, U, op.field_shape)[0]
    vol = Lattice(shape).volume
    g5 = torch.kron(torch.kron(torch.eye(vol, dtype=C128), gamma5(len(shape))), torch.eye(n_colors, dtype=C128))
    torch.testing.assert_close(m_dag, m.conj().T, rtol=0, atol=1e-14)
    torch.testing.assert_close(m_dag, g5 @ m @ g5, rtol=0, atol=1e-14)
    psi = random_spinor(op, 1, g)
    torch.testing.assert_close(op.apply_dagger(U, psi), op.gamma5(op.apply(U, op.gamma5(psi))), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "shape,n_colors",
    [((4, 4), 1), ((6, 4), 1), ((4, 2, 2, 2), 1), ((4, 4), 3), ((2, 2, 2, 2), 3), ((2, 3, 2), 2)],
)
def test_adjoint_identity_matrix_free(shape, n_colors):
    g = gen(13)
    op = WilsonDirac(Lattice(shape), 0.2, n_colors=n_colors)
    U = make_links(shape, n_colors, 3, g)
    x, y = random_spinor(op, 3, g), random_spinor(op, 3, g)
    dy = op.apply(U, y)
    assert dy.shape == (3, *op.field_shape)
    torch.testing.assert_close(inner(x, dy), inner(op.apply_dagger(U, x), y), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(op.apply_normal(U, y), op.apply_dagger(U, dy), rtol=0, atol=1e-13)
    assert (dy - y).abs().max() > 0.1
    assert isinstance(op, DiracOperator)
    if all(n % 2 == 0 for n in shape):
        assert isinstance(EvenOddWilson(op), DiracOperator)


@pytest.mark.parametrize("shape,kappa", [((4, 4), 0.2), ((6, 4), 0.3), ((4, 6), 0.24), ((2, 2, 2, 2), 0.15)])
def test_free_field_determinant(shape, kappa):
    op = WilsonDirac(Lattice(shape), kappa)
    U = torch.ones((1, len(shape), *shape), dtype=C128)
    ld = logdet(op, U)
    expected = free_logdet(shape, kappa)
    torch.testing.assert_close(ld.real, torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-10)
    assert abs(math.remainder(float(ld.imag), 2 * math.pi)) < 1e-10  # det D > 0
    torch.testing.assert_close(logdet_normal(op, U), 2 * ld.real, rtol=0, atol=1e-12)
    # periodic time gives a different determinant, matching the periodic momenta
    per = WilsonDirac(Lattice(shape), kappa, antiperiodic_time=False)
    ld_p = float(logdet(per, U).real)
    assert abs(ld_p - free_logdet(shape, kappa, antiperiodic=False)) < 1e-10
    assert abs(ld_p - expected) > 1e-3


def test_free_field_spectrum():
    """The derivation behind free_logdet: eigenvalues a(p) +- i |b(p)| with antiperiodic p_0."""
    shape, kappa = (4, 6), 0.2
    op = WilsonDirac(Lattice(shape), kappa)
    U = torch.ones((1, 2, *shape), dtype=C128)
    ev = torch.linalg.eigvals(dense_matrix(op.apply, U, op.field_shape)[0]).numpy()
    expected = []
    for n0, n1 in itertools.product(range(shape[0]), range(shape[1])):
        p = (2 * math.pi * (n0 + 0.5) / shape[0], 2 * math.pi * n1 / shape[1])
        a = 1 - 2 * kappa * (math.cos(p[0]) + math.cos(p[1]))
        b = 2 * kappa * math.hypot(math.sin(p[0]), math.sin(p[1]))
        expected += [a + 1j * b, a - 1j * b]
    key = lambda z: (round(z.real, 9), round(z.imag, 9))  # noqa: E731
    np.testing.assert_allclose(sorted(ev, key=key), sorted(expected, key=key), rtol=0, atol=1e-12)


def test_gauge_covariance_u1():
    shape = (4, 6)
    g = gen(14)
    op = WilsonDirac(Lattice(shape), 0.22)
    theta = random_theta(2, shape, g)
    alpha = random_u1_gauge_transform((2, *shape), g)
    U, U_g = u1_links(theta), u1_links(u1_gauge_transform(theta, alpha))
    omega = torch.polar(torch.ones_like(alpha), alpha).unsqueeze(-1)  # [B, *L, 1]
    psi = random_spinor(op, 2, g)
    torch.testing.assert_close(op.apply(U_g, omega * psi), omega * op.apply(U, psi), rtol=0, atol=1e-13)
    torch.testing.assert_close(op.apply_dagger(U_g, omega * psi), omega * op.apply_dagger(U, psi), rtol=0, atol=1e-13)
    assert_same_det(logdet(op, U_g), logdet(op, U))
    assert (U_g - U).abs().max() > 0.1


def test_gauge_covariance_sun():
    shape, n = (2, 4), 3
    g = gen(15)
    op = WilsonDirac(Lattice(shape), 0.2, n_colors=n)
    U = random_sun((1, 2, *shape), n, g)
    omega = random_sun((1, *shape), n, g)  # [B, *L, N, N]
    U_g = torch.stack(
        [omega @ U[:, mu] @ torch.roll(omega, -1, 1 + mu).conj().transpose(-1, -2) for mu in range(2)], dim=1
    )
    psi = random_spinor(op, 1, g)
    rot = lambda f: torch.einsum("...ab,...sb->...sa", omega, f)  # noqa: E731
    torch.testing.assert_close(op.apply(U_g, rot(psi)), rot(op.apply(U, psi)), rtol=0, atol=1e-13)
    assert_same_det(logdet(op, U_g), logdet(op, U))


def test_grad_path_and_link_cache():
    """Autograd path (roll based) equals the no-grad path; gradients match finite differences;
    the prepared-links cache notices in-place changes of U."""
    shape = (4, 4)
    g = gen(16)
    for n_colors in (1, 2):
        op = WilsonDirac(Lattice(shape), 0.2, n_colors=n_colors)
        U = make_links(shape, n_colors, 2, g)
        psi, chi = random_spinor(op, 2, g), random_spinor(op, 2, g)
        with torch.no_grad():
            fast = op.apply(U, psi)
        Ug = U.clone().requires_grad_(True)
        slow = op.apply(Ug, psi)
        torch.testing.assert_close(slow.detach(), fast, rtol=0, atol=1e-14)
    op = WilsonDirac(Lattice(shape), 0.2)
    theta = random_theta(1, shape, g).requires_grad_(True)
    psi, chi = random_spinor(op, 1, g), random_spinor(op, 1, g)
    f = lambda t: inner(chi, op.apply_normal(u1_links(t), psi)).real.sum()  # noqa: E731
    (grad,) = torch.autograd.grad(f(theta), theta)
    eps = 1e-6
    for idx in [(0, 0, 3, 1), (0, 1, 0, 2)]:
        tp, tm = theta.detach().clone(), theta.detach().clone()
        tp[idx] += eps
        tm[idx] -= eps
        fd = (f(tp) - f(tm)) / (2 * eps)
        assert abs(float(fd) - float(grad[idx])) < 1e-7
    # inference mode first, then autograd on the same operator (no inference tensors leak into caches)
    op_i = WilsonDirac(Lattice(shape), 0.2)
    U = random_u1(1, shape, g)
    with torch.inference_mode():
        ref = op_i.apply(U, psi)
    theta_g = theta.detach().clone().requires_grad_(True)
    inner(chi, op_i.apply(u1_links(theta_g), psi)).real.sum().backward()
    torch.testing.assert_close(op_i.apply(U, psi), ref, rtol=0, atol=0)
    # cache invalidation: change the links in place
    U = random_u1(1, shape, g)
    before = op.apply(U, psi)
    U[:, 1].mul_(torch.polar(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)))
    torch.testing.assert_close(op.apply(U, psi), op.apply(U.clone(), psi), rtol=0, atol=0)
    assert (op.apply(U, psi) - before).abs().max() > 1e-3


def test_complex64_apply():
    shape = (6, 4)
    g = gen(17)
    op = WilsonDirac(Lattice(shape), 0.25)
    U = random_u1(2, shape, g)
    psi = random_spinor(op, 2, g)
    out64 = op.apply(U.to(torch.complex64), psi.to(torch.complex64))
    assert out64.dtype == torch.complex64
    torch.testing.assert_close(out64.to(C128), op.apply(U, psi), rtol=0, atol=1e-5)


@pytest.mark.statistical
def test_with_kappa_and_helpers(record_z):
    op = WilsonDirac(Lattice((4, 4)), 0.2, n_colors=3)
    heavy = op.with_kappa(0.1)
    assert heavy.kappa == 0.1 and heavy.n_colors == 3 and heavy.field_shape == (4, 4, 2, 3)
    assert op.n_spin == 2 and op.lattice.shape == (4, 4)
    U = random_sun((2, 2, 4, 4), 3, gen(18))
    z = op.zeros(U)
    assert z.shape == (2, 4, 4, 2, 3) and z.dtype == C128 and not z.any()
    chi = op.gaussian(4000, gen(stat_seed(19)))
    n2 = (chi.abs() ** 2).flatten()  # density exp(-|chi|^2): <|chi|^2> = 1 per component
    z = float((n2.mean() - 1.0) / (n2.std() / math.sqrt(n2.numel())))
    record_z("|chi|^2", z, 4.0)
    assert abs(z) < 4, z


# ---------------------------------------------------------------------------------- even/odd
@pytest.mark.parametrize(
    "shape,n_colors,kappa", [((4, 4), 1, 0.25), ((6, 6), 1, 0.27), ((2, 2, 2, 4), 1, 0.13), ((4, 2), 3, 0.22)]
)
def test_evenodd_determinant(shape, n_colors, kappa):
    g = gen(21)
    op = WilsonDirac(Lattice(shape), kappa, n_colors=n_colors)
    eo = EvenOddWilson(op)
    U = make_links(shape, n_colors, 2, g)
    ld_full, ld_eo = logdet(op, U), logdet(eo, U)
    assert_same_det(ld_full, ld_eo, atol=1e-10)
    torch.testing.assert_close(logdet_normal(eo, U), logdet_normal(op, U), rtol=0, atol=1e-10)
    # the even subspace has half the dimension
    n_even = dense_matrix(eo.apply, U, eo.field_shape, mask=eo.even_mask).shape[-1]
    assert n_even * 2 == Lattice(shape).volume * op.n_spin * n_colors


def test_evenodd_operator_and_solve():
    shape = (6, 4)
    g = gen(22)
    op = WilsonDirac(Lattice(shape), 0.24)
    eo = EvenOddWilson(op)
    U = random_u1(3, shape, g)
    b = random_spinor(op, 3, g)
    odd = eo.odd_mask
    psi = eo.project_even(b)
    for out in (eo.apply(U, psi), eo.apply_dagger(U, psi), eo.apply_normal(U, psi)):
        assert bool((out[:, odd] == 0).all())
        assert out[:, eo.even_mask].abs().max() > 0.1
    x = eo.project_even(random_spinor(op, 3, g))
    torch.testing.assert_close(inner(x, eo.apply(U, psi)), inner(eo.apply_dagger(U, x), psi), rtol=1e-13, atol=1e-12)
    # M_hat psi = psi - kappa^2 H H psi with the full hop
    torch.testing.assert_close(eo.apply(U, psi), psi - op.kappa**2 * op.hop(U, op.hop(U, psi)), rtol=0, atol=1e-13)
    for method in ("cgnr", "bicgstab"):
        res = eo.solve(U, b, tol=1e-10, max_iter=500, method=method)
        assert isinstance(res, SolverResult) and res.iterations.shape == (3,)
        r = b - op.apply(U, res.x)
        rel = r.reshape(3, -1).norm(dim=1) / b.reshape(3, -1).norm(dim=1)
        assert bool((rel < 1e-10).all())
        torch.testing.assert_close(res.residual, rel, rtol=1e-3, atol=1e-14)
    # fewer iterations than the unpreconditioned normal-equation solve
    plain = cgnr(lambda v: op.apply(U, v), lambda v: op.apply_dagger(U, v), b, tol=1e-10)
    assert int(res.iterations.max()) < int(plain.iterations.max())


def test_evenodd_bad_input():
    with pytest.raises(ValueError, match="even extents"):
        EvenOddWilson(WilsonDirac(Lattice((4, 3)), 0.2))
    op = WilsonDirac(Lattice((4, 4)), 0.2)
    eo = EvenOddWilson(op)
    g = gen(23)
    U = random_u1(1, (4, 4), g)
    psi = random_spinor(op, 1, g)
    for fn in (eo.apply, eo.apply_dagger, eo.apply_normal):
        with pytest.raises(ValueError, match="odd-site"):
            fn(U, psi)
    single = eo.project_even(psi)
    single[0, 3, 2, 1] = 1e-300  # one odd site
    with pytest.raises(ValueError, match="odd-site"):
        eo.apply(U, single)
    eo.apply(U, eo.project_even(single))
    with pytest.raises(ValueError, match="expects spinors"):
        eo.project_even(psi[..., 0])
    # unchecked operator (hot loops) accepts it
    EvenOddWilson(op, check_parity=False).apply(U, psi)


# ---------------------------------------------------------------------------------- solvers
def hot_setup(shape=(8, 8), kappa=0.2, batch=2, seed=31):
    g = gen(seed)
    op = WilsonDirac(Lattice(shape), kappa)
    return op, random_u1(batch, shape, g), random_spinor(op, batch, g)


def test_cg_solves_normal_equations():
    op, U, b = hot_setup()
    res = cg(lambda v: op.apply_normal(U, v), b, tol=1e-10, max_iter=1000)
    assert res.x.shape == b.shape and res.iterations.dtype == torch.int64 and res.residual.dtype == torch.float64
    assert bool((res.residual < 1e-10).all())
    true = (b - op.apply_dagger(U, op.apply(U, res.x))).reshape(2, -1).norm(dim=1) / b.reshape(2, -1).norm(dim=1)
    torch.testing.assert_close(res.residual, true, rtol=1e-6, atol=1e-15)
    assert bool((true < 1e-10).all())
    # matches a dense solve
    m = dense_matrix(op.apply, U, op.field_shape)
    x_dense = torch.linalg.solve(m.conj().transpose(1, 2) @ m, b.reshape(2, -1, 1)).reshape(b.shape)
    torch.testing.assert_close(res.x, x_dense, rtol=0, atol=1e-7)
    # a good initial guess needs fewer iterations; b = 0 gives x = 0 at once
    res2 = cg(lambda v: op.apply_normal(U, v), b, tol=1e-10, x0=res.x + 1e-6 * b)
    assert bool((res2.iterations < res.iterations).all())
    res0 = cg(lambda v: op.apply_normal(U, v), torch.zeros_like(b))
    assert not res0.x.any() and not res0.iterations.any()


def test_cg_iterations_grow_with_kappa():
    iters = []
    for kappa in (0.1, 0.2, 0.26):
        op, U, b = hot_setup(kappa=kappa, seed=32)
        iters.append(int(cg(lambda v: op.apply_normal(U, v), b, tol=1e-10).iterations.max()))
    assert iters[0] < iters[1] < iters[2], iters


def test_cg_batch_converges_independently():
    """Two systems of very different condition number in one batch: D^dag D at kappa = 0.1 and 0.27."""
    shape = (8, 8)
    g = gen(33)
    ops = [WilsonDirac(Lattice(shape), 0.1), WilsonDirac(Lattice(shape), 0.27)]
    U = random_u1(2, shape, g)
    b = random_spinor(ops[0], 2, g)

    def A(v):
        return torch.cat([ops[k].apply_normal(U[k : k + 1], v[k : k + 1]) for k in range(2)])

    cond = [
        float(torch.linalg.cond(dense_matrix(ops[k].apply_normal, U[k : k + 1], ops[k].field_shape)[0]))
        for k in range(2)
    ]
    assert cond[1] > 20 * cond[0]
    res = cg(A, b, tol=1e-10)
    assert int(res.iterations[1]) > 3 * int(res.iterations[0]), res.iterations
    for k in range(2):
        solo = cg(lambda v: ops[k].apply_normal(U[k : k + 1], v), b[k : k + 1], tol=1e-10)
        assert int(solo.iterations[0]) == int(res.iterations[k])
        torch.testing.assert_close(solo.x[0], res.x[k], rtol=0, atol=1e-12)
    # a diagonal batch: the well-conditioned system stops early and stays put
    lam = torch.stack([torch.linspace(1, 2, 50), torch.logspace(-4, 0, 50)]).to(torch.float64)
    rhs = torch.ones(2, 50, dtype=torch.float64)
    res = cg(lambda v: lam * v, rhs, tol=1e-12)
    assert int(res.iterations[0]) < int(res.iterations[1])
    torch.testing.assert_close(res.x, rhs / lam, rtol=1e-10, atol=0)


def test_convergence_error():
    op, U, b = hot_setup()
    with pytest.raises(ConvergenceError) as info:
        cg(lambda v: op.apply_normal(U, v), b, tol=1e-10, max_iter=5)
    msg = str(info.value)
    assert "cg" in msg and "tol=1e-10" in msg and "max_iter=5" in msg and "residual" in msg and "\n" not in msg
    assert isinstance(info.value, RuntimeError)
    assert info.value.result.iterations.tolist() == [5, 5]
    with pytest.raises(ConvergenceError, match="bicgstab.*max_iter=3"):
        bicgstab(lambda v: op.apply(U, v), b, tol=1e-10, max_iter=3)
    with pytest.raises(ValueError, match="tol"):
        cg(lambda v: v, b, tol=0.0)


def test_bicgstab_and_cgnr_solve_wilson():
    op, U, b = hot_setup(kappa=0.24, batch=3)
    for res in (
        bicgstab(lambda v: op.apply(U, v), b, tol=1e-10),
        cgnr(lambda v: op.apply(U, v), lambda v: op.apply_dagger(U, v), b, tol=1e-10),
    ):
        r = (b - op.apply(U, res.x)).reshape(3, -1).norm(dim=1) / b.reshape(3, -1).norm(dim=1)
        assert bool((r < 1e-10).all())
        torch.testing.assert_close(res.residual, r, rtol=1e-6, atol=1e-15)
        assert bool((res.iterations > 0).all())


def test_solvers_real_systems():
    """Real right-hand sides and operators: a non-symmetric well-conditioned matrix per system."""
    g = gen(34)
    n = 30
    mats = torch.eye(n, dtype=torch.float64) * 4 + torch.randn((3, n, n), generator=g, dtype=torch.float64) / n**0.5
    b = torch.randn((3, n), generator=g, dtype=torch.float64)
    A = lambda v: (mats @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    At = lambda v: (mats.transpose(1, 2) @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    exact = torch.linalg.solve(mats, b)
    for res in (bicgstab(A, b, tol=1e-12), cgnr(A, At, b, tol=1e-12)):
        assert res.x.dtype == torch.float64 and bool((res.residual < 1e-12).all())
        torch.testing.assert_close(res.x, exact, rtol=0, atol=1e-10)
    spd = mats @ mats.transpose(1, 2)
    res = cg(lambda v: (spd @ v.unsqueeze(-1)).squeeze(-1), b, tol=1e-12)
    torch.testing.assert_close(res.x, torch.linalg.solve(spd, b), rtol=0, atol=1e-10)


def test_solvers_complex64():
    op, U, b = hot_setup(kappa=0.2)
    U, b = U.to(torch.complex64), b.to(torch.complex64)
    res = cg(lambda v: op.apply_normal(U, v), b, tol=1e-5)
    assert res.x.dtype == torch.complex64 and res.residual.dtype == torch.float32
    r = b.to(C128) - op.apply_normal(U.to(C128), res.x.to(C128))
    assert bool((r.reshape(2, -1).norm(dim=1) / b.to(C128).reshape(2, -1).norm(dim=1) < 2e-5).all())
    res = bicgstab(lambda v: op.apply(U, v), b, tol=1e-5)
    assert bool((res.residual < 1e-5).all())
    eo = EvenOddWilson(op)
    res = eo.solve(U, b, tol=1e-5)
    assert bool((res.residual < 1e-5).all())


# ---------------------------------------------------------------------------------- bad input
def test_bad_input():
    op = WilsonDirac(Lattice((4, 4)), 0.2)
    g = gen(41)
    U = random_u1(2, (4, 4), g)
    psi = random_spinor(op, 2, g)
    with pytest.raises(ValueError, match="expects links"):
        op.apply(U[:, :, :3], psi)
    with pytest.raises(ValueError, match="expects links"):
        op.apply(U[:, 0], psi)
    with pytest.raises(ValueError, match="complex"):
        op.apply(random_theta(2, (4, 4), g), psi)
    with pytest.raises(ValueError, match="expects spinors"):
        op.apply(U, psi[..., :1])
    with pytest.raises(ValueError, match="expects spinors"):
        op.apply(U, psi[:1])
    with pytest.raises(ValueError, match="dtype"):
        op.apply(U, psi.to(torch.complex64))
    with pytest.raises(ValueError, match="expects links"):
        WilsonDirac(Lattice((4, 4)), 0.2, n_colors=3).apply(U, psi)
    with pytest.raises(ValueError, match="kappa"):
        WilsonDirac(Lattice((4, 4)), float("nan"))
    with pytest.raises(ValueError, match="d >= 2"):
        WilsonDirac(Lattice((4,)), 0.1)
    with pytest.raises(ValueError, match="real"):
        u1_links(U)
    with pytest.raises(ValueError, match="mask"):
        dense_matrix(op.apply, U, op.field_shape, mask=torch.ones(3, 4, dtype=torch.bool))
