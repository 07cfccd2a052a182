"""SU(N) group numerics and SU(N) lattice pieces (latflow.sun).

Haar sampling (unitarity, determinant, exact moments of traces and entries, left and right
invariance), projection, exponential and logarithm, differentiable eigenphases (gradcheck, and
finite exact gradients at degenerate points), Gaussian algebra elements, and the lattice pieces:
plaquettes against explicit site arithmetic and against the U(1) code for N = 1, gauge
invariance, the cold start, and the staple identity. Statistical tests take their seeds from
``stat_seed`` (``--seed-offset``) and bound a chi-squared p-value of several moments at once.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import stat_seed
from scipy import stats

from latflow.gauge import plane_index, planes, u1_plaquette_angles, u1_polyakov_loop, u1_staples
from latflow.sun import (
    algebra_norm2,
    dagger,
    eigenphases,
    expm_su,
    haar_sun,
    logm_su,
    plaquette_mean,
    polyakov_loop,
    project_sun,
    random_algebra,
    reunitarize,
    sun_gauge_transform,
    sun_plaquettes,
    sun_staples,
    traceless_antihermitian,
    wilson_action,
)

C128 = torch.complex128
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def eye(n: int, dtype: torch.dtype = C128) -> torch.Tensor:
    return torch.eye(n, dtype=dtype)


def trace(m: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(m, dim1=-2, dim2=-1).sum(-1)


def moments_chi2(samples: torch.Tensor, expected: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Chi-squared p-value of sample means ``[n, k]`` against ``expected`` ``[k]``, and the z-scores ``[k]``.

    Uses the sample covariance of the k observables, restricted to its non-degenerate
    directions (observables that are identically zero or functions of each other drop out).
    """
    n = samples.shape[0]
    mean = samples.mean(0)
    cov = torch.cov(samples.T) / n
    err = cov.diagonal().sqrt()
    diff = mean - expected
    # an observable that is constant on the group (e.g. Im tr U for SU(2)) must hit its value to rounding
    constant = err < 1e-9
    z = torch.where(constant, torch.where(diff.abs() < 1e-12, 0.0, math.inf), diff / err.clamp_min(1e-300))
    w, v = torch.linalg.eigh(cov)
    keep = w > 1e-10 * w.max()
    proj = v[:, keep].T @ diff
    chi2 = float((proj.square() / w[keep]).sum())
    return float(stats.chi2.sf(chi2, int(keep.sum()))), z


def haar_observables(u: torch.Tensor) -> torch.Tensor:
    """``[n, 9]``: Re/Im tr U, |tr U|^2, |tr U|^4, Re/Im (tr U)^N, |U_00|^2, |U_00|^4, |U_01|^2."""
    n = u.shape[-1]
    t = trace(u)
    tn = t**n
    return torch.stack(
        [
            t.real,
            t.imag,
            t.abs() ** 2,
            t.abs() ** 4,
            tn.real,
            tn.imag,
            u[..., 0, 0].abs() ** 2,
            u[..., 0, 0].abs() ** 4,
            u[..., 0, 1].abs() ** 2,
        ],
        dim=1,
    )


def haar_expected(n: int) -> torch.Tensor:
    """Exact SU(N) Haar values of :func:`haar_observables` (N >= 2).

    ``<(tr U)^N> = 1`` counts the singlet ``det`` in the N-fold tensor power (0 for U(N));
    balanced moments equal the U(N) ones: ``<|tr U|^2> = 1``, ``<|tr U|^4> = 2``,
    ``<|U_ij|^2> = 1/N``, ``<|U_ij|^4> = 2 / (N (N+1))``.
    """
    return torch.tensor([0, 0, 1, 2, 1, 0, 1 / n, 2 / (n * (n + 1)), 1 / n], dtype=F64)


# --- Haar measure -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_haar_is_special_unitary(n: int) -> None:
    u = haar_sun((50, 3), n, gen(1))
    assert u.shape == (50, 3, n, n) and u.dtype == C128
    assert (u @ dagger(u) - eye(n)).abs().max() < 1e-12
    assert (torch.linalg.det(u) - 1).abs().max() < 1e-12
    u32 = haar_sun((50,), n, gen(1), dtype=torch.complex64)
    assert u32.dtype == torch.complex64
    assert (u32 @ dagger(u32) - eye(n, torch.complex64)).abs().max() < 1e-5
    assert (torch.linalg.det(u32) - 1).abs().max() < 1e-5


def test_haar_reproducible_and_rejects_bad_input() -> None:
    assert torch.equal(haar_sun((4,), 3, gen(5)), haar_sun((4,), 3, gen(5)))
    assert not torch.equal(haar_sun((4,), 3, gen(5)), haar_sun((4,), 3, gen(6)))
    with pytest.raises(ValueError):
        haar_sun((4,), 0, gen(5))
    with pytest.raises(ValueError):
        haar_sun((4,), 2, gen(5), dtype=F64)


@pytest.mark.statistical
@pytest.mark.parametrize("n", [2, 3, 4])
def test_haar_moments(n: int, record_z) -> None:
    u = haar_sun((20000,), n, gen(stat_seed(100 + n)))
    p, z = moments_chi2(haar_observables(u), haar_expected(n))
    for i, zi in enumerate(z.tolist()):
        record_z(f"haar moment {i}", zi, 5.0)
    assert p > 1e-3, (p, z)
    assert z.abs().max() < 5.0, z


@pytest.mark.statistical
@pytest.mark.parametrize("n", [2, 3, 4])
def test_haar_left_and_right_invariance(n: int, record_z) -> None:
    g = gen(stat_seed(200 + n))
    u = haar_sun((20000,), n, g)
    phases = torch.tensor([0.9 * (k + 1) for k in range(n - 1)], dtype=F64)
    phases = torch.cat([phases, -phases.sum().reshape(1)])
    fixed = [haar_sun((), n, g), torch.diag(torch.polar(torch.ones_like(phases), phases))]
    for j, v in enumerate(fixed):
        for side, w in (("left", v @ u), ("right", u @ v)):
            p, z = moments_chi2(haar_observables(w), haar_expected(n))
            for i, zi in enumerate(z.tolist()):
                record_z(f"{side} V{j} moment {i}", zi, 5.0)
            assert p > 1e-3, (side, j, p, z)
            assert z.abs().max() < 5.0, (side, j, z)


# --- projection ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_projection(n: int) -> None:
    g = gen(10 + n)
    u = haar_sun((200,), n, g)
    assert reunitarize is project_sun
    assert (project_sun(u) - u).abs().max() < 1e-12  # idempotent on SU(N)
    x = torch.randn((200, n, n), generator=g, dtype=C128)
    hermitian = 0.5 * (x + dagger(x))
    c = torch.randn((200, 1, 1), generator=g, dtype=F64)
    errors_normal, errors_generic = [], []
    for eps in (1e-2, 1e-3):
        # normal to SU(N): Hermitian and imaginary-scalar directions are removed up to O(eps^2)
        m = u @ (eye(n) + eps * hermitian + 1j * eps * c * eye(n))
        pm = project_sun(m)
        assert (pm @ dagger(pm) - eye(n)).abs().max() < 1e-12
        assert (torch.linalg.det(pm) - 1).abs().max() < 1e-12
        errors_normal.append(float((pm - u).abs().max()))
        # generic: the tangent part survives as U exp(eps ta(X)), the rest is O(eps^2)
        m = u @ (eye(n) + eps * x)
        pm = project_sun(m)
        errors_generic.append(float((pm - u @ expm_su(eps * traceless_antihermitian(x))).abs().max()))
    for errors in (errors_normal, errors_generic):
        assert errors[0] < 50 * 1e-4
        assert 50 < errors[0] / errors[1] < 200  # quadratic in eps
    # the projection of a generic matrix is in SU(N) and invariant under SU(N) x SU(N)
    m = torch.randn((50, n, n), generator=g, dtype=C128)
    pm = project_sun(m)
    assert (torch.linalg.det(pm) - 1).abs().max() < 1e-12
    v, w = haar_sun((50,), n, g), haar_sun((50,), n, g)
    assert (project_sun(v @ m @ w) - v @ pm @ w).abs().max() < 1e-10
    m32 = m.to(torch.complex64)
    assert (torch.linalg.det(project_sun(m32)) - 1).abs().max() < 1e-5


# --- exponential, logarithm, eigenphases ----------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_exp_and_log(n: int) -> None:
    g = gen(20 + n)
    a = random_algebra((300,), n, g)
    # scale so that sum |phi| < 2 pi: then logm_su is the principal log and inverts expm_su
    a = a * (1.5 / a.abs().sum(dim=(-2, -1), keepdim=True).clamp_min(1.0))
    u = expm_su(a)
    assert (u @ dagger(u) - eye(n)).abs().max() < 1e-12
    assert (torch.linalg.det(u) - 1).abs().max() < 1e-12
    assert (logm_su(u) - a).abs().max() < 1e-10
    # expm_su(logm_su(u)) = u on all of SU(N), including where principal phases sum to +-2 pi
    u = haar_sun((1000,), n, g)
    log = logm_su(u)
    assert (log + dagger(log)).abs().max() < 1e-12
    assert trace(log).abs().max() < 1e-12
    assert (expm_su(log) - u).abs().max() < 1e-10
    k = torch.round(eigenphases(u).sum(-1) / (2 * math.pi))
    if n >= 3:
        assert (k != 0).any()  # the shifted branch is exercised
    # centre elements other than the identity
    for j in range(1, n):
        z = torch.polar(torch.tensor(1.0, dtype=F64), torch.tensor(2 * math.pi * j / n, dtype=F64)) * eye(n)
        log = logm_su(z)
        assert trace(log).abs() < 1e-12
        assert (expm_su(log) - z).abs().max() < 1e-12


@pytest.mark.parametrize("n", [2, 3, 4])
def test_eigenphases_values(n: int) -> None:
    u = haar_sun((500,), n, gen(30 + n))
    phi = eigenphases(u)
    assert phi.shape == (500, n) and phi.dtype == F64
    assert (phi[:, 1:] >= phi[:, :-1]).all()
    assert (phi > -math.pi).all() and (phi <= math.pi).all()
    s = phi.sum(-1) / (2 * math.pi)
    assert (s - s.round()).abs().max() < 1e-12
    lam = torch.linalg.eigvals(u)
    lam = torch.gather(lam, -1, torch.argsort(torch.angle(lam), dim=-1))
    assert (torch.polar(torch.ones_like(phi), phi) - lam).abs().max() < 1e-12
    # similarity invariance
    v = haar_sun((500,), n, gen(40 + n))
    assert (eigenphases(v @ u @ dagger(v)) - phi).abs().max() < 1e-10
    assert (eigenphases(eye(n)).abs() < 1e-14).all()


@pytest.mark.parametrize("n", [2, 3])
def test_eigenphases_gradcheck(n: int) -> None:
    u = haar_sun((3,), n, gen(50 + n)).requires_grad_(True)
    assert torch.autograd.gradcheck(eigenphases, (u,), eps=1e-6, atol=1e-6)
    # a generic (non-unitary) complex matrix as well
    m = torch.randn((2, n, n), generator=gen(60 + n), dtype=C128).requires_grad_(True)
    assert torch.autograd.gradcheck(eigenphases, (m,), eps=1e-6, atol=1e-6)


def _class_function_derivative(u0: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``d/dt sum_i cos(2 phi_i)(u0 exp(t x))`` at ``t = 0`` by autograd through eigenphases, and exactly.

    Exact: with ``u0 = V diag(exp(i phi)) V^dagger`` and ``Y = V^dagger x V``, ``dphi_i = -i Y_ii``
    summed over each degenerate block (well defined for class functions).
    """
    t = torch.zeros((), dtype=F64, requires_grad=True)
    phi = eigenphases(u0 @ torch.linalg.matrix_exp(t * x))
    f = torch.cos(2 * phi).sum()
    (grad,) = torch.autograd.grad(f, t)
    lam, v = torch.linalg.eig(u0)
    # u0 is normal; re-orthonormalise eigenvectors within degenerate blocks via QR of V
    q, _ = torch.linalg.qr(v)
    y = dagger(q) @ x @ q
    phases = torch.angle(torch.diagonal(dagger(q) @ u0 @ q))
    dphi = (-1j * torch.diagonal(y)).real
    exact = (-2 * torch.sin(2 * phases) * dphi).sum()
    return grad, exact


@pytest.mark.parametrize("n", [2, 3, 4])
def test_eigenphase_gradient_finite_and_exact_at_degenerate_points(n: int) -> None:
    g = gen(70 + n)
    points = []
    for j in range(n):  # centre elements, identity first
        points.append(torch.polar(torch.tensor(1.0, dtype=F64), torch.tensor(2 * math.pi * j / n, dtype=F64)) * eye(n))
    if n >= 3:  # a partly degenerate spectrum diag(e^{ia}, e^{ia}, ..., e^{-i(N-1)a}) in a random basis
        a = 0.4
        ph = torch.full((n,), a, dtype=F64)
        ph[-1] = -(n - 1) * a
        v = haar_sun((), n, g)
        points.append(v @ torch.diag(torch.polar(torch.ones_like(ph), ph)) @ dagger(v))
    for u0 in points:
        for _ in range(3):
            x = random_algebra((), n, g)
            grad, exact = _class_function_derivative(u0, x)
            assert torch.isfinite(grad)
            assert abs(float(grad - exact)) < 1e-8
        # gradient with respect to the matrix itself is finite too
        u = u0.clone().requires_grad_(True)
        (gu,) = torch.autograd.grad(eigenphases(u).square().sum(), u)
        assert torch.isfinite(gu.real).all() and torch.isfinite(gu.imag).all()


# --- algebra ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3])
def test_random_algebra_is_traceless_antihermitian(n: int) -> None:
    p = random_algebra((100, 2), n, gen(80 + n))
    assert p.shape == (100, 2, n, n)
    assert (p + dagger(p)).abs().max() < 1e-15
    assert trace(p).abs().max() < 1e-14
    norm2 = algebra_norm2(p)
    assert norm2.shape == (100, 2) and norm2.dtype == F64
    assert torch.allclose(norm2, -trace(p @ p).real, atol=1e-12)
    p32 = random_algebra((10,), n, gen(1), dtype=torch.complex64)
    assert p32.dtype == torch.complex64
    assert (torch.linalg.det(expm_su(p32)) - 1).abs().max() < 1e-5


@pytest.mark.statistical
@pytest.mark.parametrize("n", [2, 3, 4])
def test_random_algebra_normalisation(n: int, record_z) -> None:
    p = random_algebra((20000,), n, gen(stat_seed(300 + n)))
    obs = torch.stack(
        [algebra_norm2(p), p[:, 0, 1].abs() ** 2, p[:, 0, 0].abs() ** 2, p[:, 0, 1].real, p[:, 0, 0].imag], dim=1
    )
    expected = torch.tensor([(n * n - 1) / 2, 0.5, (n - 1) / (2 * n), 0.0, 0.0], dtype=F64)
    pvalue, z = moments_chi2(obs, expected)
    for i, zi in enumerate(z.tolist()):
        record_z(f"algebra moment {i}", zi, 5.0)
    assert pvalue > 1e-3, (pvalue, z)
    assert z.abs().max() < 5.0, z
    # tr(P^dagger P) = sum_a p_a^2 / 2 is (1/2) chi^2 with N^2 - 1 degrees of freedom
    ks = stats.kstest((2 * algebra_norm2(p)).numpy(), stats.chi2(n * n - 1).cdf)
    assert ks.pvalue > 1e-3


# --- lattice ------------------------------------------------------------------------------

SHAPES = [(4, 4), (3, 4), (2, 3, 2, 2)]


def links(shape: tuple[int, ...], n: int, seed: int, batch: int = 2) -> torch.Tensor:
    return haar_sun((batch, len(shape), *shape), n, gen(seed))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3])
def test_plaquettes_against_explicit_sites(shape: tuple[int, ...], n: int) -> None:
    d = len(shape)
    u = links(shape, n, 1)
    p = sun_plaquettes(u)
    assert p.shape == (2, d * (d - 1) // 2, *shape, n, n)

    def site(x, mu):
        y = list(x)
        y[mu] = (y[mu] + 1) % shape[mu]
        return tuple(y)

    for x in itertools.islice(itertools.product(*map(range, shape)), 0, None, 5):
        for mu, nu in planes(d):
            expected = (
                u[(slice(None), mu, *x)]
                @ u[(slice(None), nu, *site(x, mu))]
                @ dagger(u[(slice(None), mu, *site(x, nu))])
                @ dagger(u[(slice(None), nu, *x)])
            )
            got = p[(slice(None), plane_index(mu, nu, d), *x)]
            assert (got - expected).abs().max() < 1e-13


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3])
def test_cold_start(shape: tuple[int, ...], n: int) -> None:
    d = len(shape)
    u = eye(n).expand(3, d, *shape, n, n).clone()
    volume = math.prod(shape)
    n_planes = d * (d - 1) // 2
    assert torch.allclose(plaquette_mean(u), torch.ones(3, dtype=F64), atol=1e-15)
    assert torch.allclose(wilson_action(u, 5.5), torch.full((3,), -5.5 * n_planes * volume, dtype=F64))
    assert torch.allclose(polyakov_loop(u), torch.ones((3, *shape[1:]), dtype=C128))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3])
def test_gauge_invariance(shape: tuple[int, ...], n: int) -> None:
    u = links(shape, n, 2)
    omega = haar_sun((2, *shape), n, gen(3))
    v = sun_gauge_transform(u, omega)
    assert v.shape == u.shape
    assert (v @ dagger(v) - eye(n)).abs().max() < 1e-12
    assert torch.allclose(wilson_action(v, 2.3), wilson_action(u, 2.3), atol=1e-10)
    assert torch.allclose(plaquette_mean(v), plaquette_mean(u), atol=1e-12)
    tr_u, tr_v = trace(sun_plaquettes(u)), trace(sun_plaquettes(v))
    assert (tr_u - tr_v).abs().max() < 1e-12  # tr P per site and plane
    assert (polyakov_loop(v) - polyakov_loop(u)).abs().max() < 1e-12
    loop_u, loop_v = polyakov_loop(u, traced=False), polyakov_loop(v, traced=False)
    om0 = omega[:, 0]
    assert (loop_v - om0 @ loop_u @ dagger(om0)).abs().max() < 1e-12
    # an unbatched gauge field is applied to every configuration; a gauge transformation is not trivial
    w = sun_gauge_transform(u, omega[0])
    assert (w[0] - v[0]).abs().max() < 1e-14
    assert (v - u).abs().max() > 0.1
    with pytest.raises(ValueError):
        sun_gauge_transform(u, omega[:, :1])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3])
def test_staples_give_the_action_dependence_on_one_link(shape: tuple[int, ...], n: int) -> None:
    d = len(shape)
    beta = 1.7
    u = links(shape, n, 4, batch=3)
    g = gen(5)
    total = torch.zeros(3, dtype=F64)
    for mu in range(d):
        a = sun_staples(u, mu)
        assert a.shape == (3, *shape, n, n)
        total = total + trace(u[:, mu] @ a).real.flatten(1).sum(1)
        for _ in range(3):
            x = tuple(int(torch.randint(m, (), generator=g)) for m in shape)
            index = (slice(None), mu, *x)
            moved = u.clone()
            moved[index] = haar_sun((3,), n, g)
            ds = wilson_action(moved, beta) - wilson_action(u, beta)
            a_x = a[(slice(None), *x)]
            expected = -(beta / n) * trace((moved[index] - u[index]) @ a_x).real
            assert torch.allclose(ds, expected, atol=1e-11)
            # the staple of that link does not depend on the link itself
            assert (sun_staples(moved, mu)[(slice(None), *x)] - a_x).abs().max() < 1e-12
    # every plaquette has four links
    assert torch.allclose(total, 4 * trace(sun_plaquettes(u)).real.flatten(1).sum(1), atol=1e-10)
    with pytest.raises(ValueError):
        sun_staples(u, d)


@pytest.mark.parametrize("shape", SHAPES)
def test_n1_agrees_with_u1(shape: tuple[int, ...]) -> None:
    d = len(shape)
    theta = 4 * torch.randn((2, d, *shape), generator=gen(6), dtype=F64)
    u = torch.polar(torch.ones_like(theta), theta)[..., None, None]
    p = sun_plaquettes(u)[..., 0, 0]
    assert (p - torch.polar(torch.ones_like(theta[:, :1]), u1_plaquette_angles(theta))).abs().max() < 1e-12
    for mu in range(d):
        assert (sun_staples(u, mu)[..., 0, 0] - u1_staples(theta, mu)).abs().max() < 1e-12
    assert (polyakov_loop(u) - u1_polyakov_loop(theta)).abs().max() < 1e-12
    assert torch.allclose(wilson_action(u, 1.3), -1.3 * torch.cos(u1_plaquette_angles(theta)).flatten(1).sum(1))


def test_complex64_lattice_and_bad_links() -> None:
    u = links((4, 4), 3, 7).to(torch.complex64)
    s = wilson_action(u, 6.0)
    assert s.dtype == torch.float32 and s.shape == (2,)
    assert torch.allclose(s.double(), wilson_action(u.to(C128), 6.0), rtol=1e-5)
    with pytest.raises(ValueError):
        sun_plaquettes(torch.zeros((2, 3, 4, 4, 3, 3), dtype=C128))  # d does not match the lattice axes
    with pytest.raises(ValueError):
        sun_plaquettes(torch.zeros((2, 2, 4, 4, 3, 3), dtype=F64))  # real
    with pytest.raises(ValueError):
        project_sun(torch.zeros((3, 2), dtype=C128))


def test_wilson_action_is_differentiable() -> None:
    """The autograd force of the action along an algebra direction matches the staple formula."""
    shape, n, beta = (3, 4), 3, 2.1
    u = links(shape, n, 8, batch=1)
    x = random_algebra(u.shape[:-2], n, gen(9))
    t = torch.zeros((), dtype=F64, requires_grad=True)
    s = wilson_action(expm_su(t * x) @ u, beta)
    (grad,) = torch.autograd.grad(s.sum(), t)
    # to first order the link changes add up: dS/dt = -(beta/N) sum_{x,mu} Re tr(X_mu(x) U_mu(x) A_mu(x))
    exact = sum(-(beta / n) * trace(x[:, mu] @ u[:, mu] @ sun_staples(u, mu)).real.sum() for mu in range(len(shape)))
    assert abs(float(grad - exact)) < 1e-10
