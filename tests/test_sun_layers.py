"""Spectral (conjugation-equivariant) SU(N) maps and gauge-equivariant SU(N) coupling layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.gamma import gamma_method
from latflow.flows.spectral import IntervalSpline, spectral_map
from latflow.flows.sun_layers import (
    SUNHaarPrior,
    SUNSpectralCoupling,
    coupling_schedule,
    make_sun_spectral_flow,
    sun_coupling_schedule,
    sun_masks,
)
from latflow.lattice import Lattice
from latflow.samplers import FlowMCMC
from latflow.sun import dagger, haar_sun, plaquette_mean, sun_gauge_transform, wilson_action
from latflow.training import ReverseKLTrainer, ess_per_config
from tests.conftest import stat_seed
from theories.su3 import exact_log_z, exact_plaquette

C128 = torch.complex128


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def su_basis(n: int) -> torch.Tensor:
    """Orthonormal (w.r.t. Re tr(X^dagger Y)) basis of su(N), ``[N^2 - 1, N, N]``."""
    out = []
    for i in range(n):
        for j in range(i + 1, n):
            e = torch.zeros(n, n, dtype=C128)
            e[i, j], e[j, i] = 1, -1
            out.append(e / math.sqrt(2))
            e = torch.zeros(n, n, dtype=C128)
            e[i, j], e[j, i] = 1j, 1j
            out.append(e / math.sqrt(2))
    for k in range(1, n):
        d = torch.zeros(n, dtype=C128)
        d[:k], d[k] = 1, -k
        out.append(torch.diag(1j * d / math.sqrt(k * (k + 1))))
    return torch.stack(out)


def coords(a: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return torch.einsum("...ij,bij->...b", a, basis.conj()).real


def exp_coords(t: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``exp(sum_a t_a E_a)`` for ``t [..., N^2 - 1]``."""
    return torch.linalg.matrix_exp(torch.einsum("...b,bij->...ij", t.to(C128), basis))


def random_params(shape: tuple[int, ...], spline: IntervalSpline, g: torch.Generator, scale: float = 1.0):
    return scale * torch.randn((*shape, spline.n_params), generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- spectral map


@pytest.mark.parametrize("n", [2, 3, 4])
def test_spectral_map_invertible_det_one_class_function(n):
    g = torch.Generator().manual_seed(10 + n)
    sp = IntervalSpline(6)
    w = haar_sun((16,), n, g)
    p = random_params((16, n - 1), sp, g)
    w_new, lj = spectral_map(w, p, sp)
    back, lj_r = spectral_map(w_new, p, sp, inverse=True)
    eye = torch.eye(n, dtype=C128)
    torch.testing.assert_close(back, w, rtol=0, atol=1e-12)
    torch.testing.assert_close(lj + lj_r, torch.zeros_like(lj), rtol=0, atol=1e-11)
    torch.testing.assert_close(torch.linalg.det(w_new), torch.ones(16, dtype=C128), rtol=0, atol=1e-13)
    torch.testing.assert_close(w_new @ dagger(w_new), eye.expand(16, n, n), rtol=0, atol=1e-13)
    assert (w_new - w).abs().amax() > 0.1  # not the identity
    torch.testing.assert_close(w_new @ w, w @ w_new, rtol=0, atol=1e-13)  # same eigenvectors
    # conjugation equivariance h(X W X^dagger) = X h(W) X^dagger
    x = haar_sun((16,), n, g)
    w_c, lj_c = spectral_map(x @ w @ dagger(x), p, sp)
    torch.testing.assert_close(w_c, x @ w_new @ dagger(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(lj_c, lj, rtol=0, atol=1e-11)


def test_spectral_map_permutation_equivariant():
    g = torch.Generator().manual_seed(3)
    sp = IntervalSpline(5)
    phases = torch.tensor([2.5, -0.4, -2.1], dtype=torch.float64)
    p = random_params((1, 2), sp, g)
    outs = []
    for perm in ([0, 1, 2], [2, 0, 1], [1, 0, 2]):
        w = torch.diag(torch.polar(torch.ones(3, dtype=torch.float64), phases[perm]))[None]
        w_new, lj = spectral_map(w, p, sp)
        new_phases = torch.angle(torch.diagonal(w_new[0]))
        assert (w_new[0] - torch.diag(torch.diagonal(w_new[0]))).abs().max() < 1e-13  # still diagonal
        outs.append((new_phases[torch.argsort(torch.tensor(perm))], lj))
    for ph, lj in outs[1:]:
        torch.testing.assert_close(ph, outs[0][0], rtol=0, atol=1e-13)
        torch.testing.assert_close(lj, outs[0][1], rtol=0, atol=1e-13)
    assert abs(float(outs[0][0].sum())) < 1e-12 or abs(abs(float(outs[0][0].sum())) - 2 * math.pi) < 1e-12


@pytest.mark.parametrize("n", [2, 3])
def test_spectral_map_log_jacobian_in_exponential_coordinates(n):
    """``logJ`` equals ``log|det dt'/dt|`` with ``W = exp(t.E) W0``, ``h(W) = exp(t'.E) h(W0)`` at ``t = 0``.

    Exponential coordinates have unit Haar density at ``t = 0`` (left invariance), so this is the
    Jacobian with respect to Haar; the autograd Jacobian goes through the custom eigen-backward and
    is cross-checked against central differences.
    """
    g = torch.Generator().manual_seed(20 + n)
    basis = su_basis(n)
    sp = IntervalSpline(5)
    dim = n * n - 1
    for _ in range(3):
        w0 = haar_sun((), n, g)
        p = random_params((n - 1,), sp, g)
        w0_new, lj = spectral_map(w0, p, sp)

        def f(t, w0=w0, p=p, w0_new=w0_new):
            w_new, _ = spectral_map(exp_coords(t, basis) @ w0, p, sp)
            return coords(w_new @ dagger(w0_new), basis)

        jac = torch.autograd.functional.jacobian(f, torch.zeros(dim, dtype=torch.float64))
        assert abs(float(torch.linalg.slogdet(jac)[1] - lj)) < 1e-10
        eye = torch.eye(dim, dtype=torch.float64)
        eps = 1e-6
        jac_fd = torch.stack([(f(eps * eye[k]) - f(-eps * eye[k])) / (2 * eps) for k in range(dim)], dim=1)
        torch.testing.assert_close(jac, jac_fd, rtol=0, atol=1e-8)


@pytest.mark.parametrize("n", [2, 3])
def test_spectral_map_gradcheck_away_from_degeneracy(n):
    g = torch.Generator().manual_seed(30 + n)
    basis = su_basis(n)
    sp = IntervalSpline(4)
    w0 = haar_sun((2,), n, g)
    p = random_params((2, n - 1), sp, g).requires_grad_(True)

    def f(t, p):
        w_new, lj = spectral_map(exp_coords(t, basis) @ w0, p, sp)
        return torch.view_as_real(w_new), lj

    t = (0.1 * torch.randn(2, n * n - 1, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (t, p), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [2, 3])
def test_spectral_map_gradients_finite_at_and_near_degenerate_spectra(n):
    g = torch.Generator().manual_seed(40 + n)
    basis = su_basis(n)
    sp = IntervalSpline(5)
    p = random_params((n - 1,), sp, g)
    v = haar_sun((), n, g)
    pts = [
        torch.eye(n, dtype=C128)
        * torch.polar(torch.tensor(1.0, dtype=torch.float64), torch.tensor(2 * math.pi * k / n, dtype=torch.float64))
        for k in range(n)
    ]
    spectra = [[1e-9] * (n - 1) + [-(n - 1) * 1e-9]]
    if n == 3:
        spectra += [[0.7, 0.7, -1.4], [0.7, 0.7 + 1e-10, -1.4 - 1e-10], [math.pi, math.pi, 0.0]]
    for ph in spectra:
        phases = torch.tensor(ph, dtype=torch.float64)
        pts.append(v @ torch.diag(torch.polar(torch.ones_like(phases), phases)) @ dagger(v))
    probe = torch.randn(n, n, generator=g, dtype=C128)
    for w0 in pts:
        t = torch.zeros(n * n - 1, dtype=torch.float64, requires_grad=True)
        w_new, lj = spectral_map(exp_coords(t, basis) @ w0, p, sp)
        assert torch.isfinite(lj)
        (grad_w,) = torch.autograd.grad((w_new * probe).real.sum(), t, retain_graph=True)
        (grad_lj,) = torch.autograd.grad(lj, t)
        assert torch.isfinite(grad_w).all() and torch.isfinite(grad_lj).all()
        assert grad_w.abs().max() < 1e3  # the map itself is Lipschitz: bounded derivative of W'
        # W' stays a valid SU(N) element
        torch.testing.assert_close(torch.linalg.det(w_new), torch.tensor(1.0 + 0j, dtype=C128), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("shape", [(4, 4), (8, 4), (4, 4, 4, 4), (4, 8, 4, 4)])
def test_masks_cover_every_link_and_separate_updates(shape):
    lat = Lattice(shape)
    d = lat.dim
    period = 4 * d * (2 if d > 2 else 1)
    hits = torch.zeros((d, *shape), dtype=torch.int64)
    for i in range(period):
        m = sun_masks(lat, *coupling_schedule(d, i))
        hits += m.links.to(torch.int64)
        n_planes = d * (d - 1) // 2
        assert m.frozen.shape == (n_planes, *shape)
        assert not bool((m.frozen & m.passive).any())
        assert int(m.active.sum()) == int(m.links.sum()) > 0
    assert bool((hits == 1).all())


@pytest.mark.parametrize("shape", [(4, 2), (2, 2, 2, 4), (4, 4, 2, 2)])
def test_builder_schedule_skips_empty_masks_and_covers_short_extents(shape):
    lat = Lattice(shape)
    d = lat.dim
    hits = torch.zeros((d, *shape), dtype=torch.int64)
    sched = sun_coupling_schedule(lat, 64)
    for s in sched:
        m = sun_masks(lat, *s)
        assert bool(m.links.any())
        hits += m.links.to(torch.int64)
    assert bool((hits >= 1).all())
    # one full period updates every link exactly once
    n_period = sum(
        1 for i in range(4 * d * (2 if d > 2 else 1)) if sun_masks(lat, *coupling_schedule(d, i)).links.any()
    )
    hits.zero_()
    for s in sched[:n_period]:
        hits += sun_masks(lat, *s).links.to(torch.int64)
    assert bool((hits == 1).all())


def test_masks_reject_bad_extents():
    with pytest.raises(ValueError, match="two updated links"):
        sun_masks(Lattice((4, 5)), 0, 1, 0)
    with pytest.raises(ValueError, match="two updated links"):
        sun_masks(Lattice((4, 4, 3, 4)), 0, 1, 0, 0)
    with pytest.raises(ValueError):
        sun_masks(Lattice((4, 4)), 0, 0, 0)
    with pytest.raises(ValueError):
        sun_masks(Lattice((4, 4)), 0, 1, 4)


# ----------------------------------------------------------------------------- layers


def _layer(lat: Lattice, n: int, i: int, seed: int) -> SUNSpectralCoupling:
    torch.manual_seed(seed)
    model = make_sun_spectral_flow(lat, n, i + 1, hidden=(4,), kernel_size=3, n_bins=4)
    layer = model.layers[i]
    with torch.no_grad():
        for prm in layer.parameters():
            prm.mul_(3.0)  # far from the identity
    return layer


def _algebra_jacobian(layer, u0: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    u0_new, _ = layer(u0)
    dim = basis.shape[0]
    n_links = u0[0].numel() // u0.shape[-1] ** 2

    def f(t):
        u = exp_coords(t.view(*u0.shape[1:-2], dim), basis)[None] @ u0
        u_new, _ = layer(u)
        return coords(u_new @ dagger(u0_new), basis).flatten()

    return torch.autograd.functional.jacobian(f, torch.zeros(n_links * dim, dtype=torch.float64))


@pytest.mark.parametrize(("shape", "n"), [((4, 2), 2), ((4, 2), 3), ((2, 2, 2, 4), 2)])
def test_layer_round_trip_and_full_jacobian(shape, n):
    lat = Lattice(shape)
    g = torch.Generator().manual_seed(50 + n)
    basis = su_basis(n)
    d = lat.dim
    # a layer updating direction 0 along nu = d - 1 (extent 2 or 4 fits stride 4 as long as != 1 mod 4)
    layer = _layer(lat, n, 0 if d == 2 else 3, seed=5)
    u = haar_sun((3, d, *shape), n, g)
    u_new, lj = layer(u)
    back, lj_r = layer.reverse(u_new)
    # steep splines (weights scaled up) amplify rounding in the inverse; 1e-9 is still ~1e6 eps
    torch.testing.assert_close(back, u, rtol=0, atol=1e-9)
    torch.testing.assert_close(lj + lj_r, torch.zeros_like(lj), rtol=0, atol=1e-9)
    assert (u_new - u).abs().amax() > 0.1
    # batch does not mix
    u1, lj1 = layer(u[1:2])
    torch.testing.assert_close(u1, u_new[1:2], rtol=0, atol=1e-13)
    jac = _algebra_jacobian(layer, u[:1], basis)
    assert abs(float(torch.linalg.slogdet(jac)[1] - lj[0].detach())) < 1e-8


@pytest.mark.parametrize(("shape", "n"), [((4, 4), 2), ((4, 4), 3), ((4, 2, 2, 2), 2), ((2, 2, 2, 4), 3)])
def test_layer_gauge_equivariant(shape, n):
    lat = Lattice(shape)
    d = lat.dim
    g = torch.Generator().manual_seed(60 + n + d)
    for i in (0, 1, 4 * d + 3):
        try:
            layer = _layer(lat, n, i, seed=i)
        except ValueError:
            continue  # mask does not fit this extent
        u = haar_sun((2, d, *shape), n, g)
        omega = haar_sun((2, *shape), n, g)
        u_new, lj = layer(u)
        ut_new, lj_t = layer(sun_gauge_transform(u, omega))
        torch.testing.assert_close(ut_new, sun_gauge_transform(u_new, omega), rtol=0, atol=1e-11)
        torch.testing.assert_close(lj_t, lj, rtol=0, atol=1e-10)
        rev, lj_r = layer.reverse(sun_gauge_transform(u_new, omega))
        torch.testing.assert_close(rev, sun_gauge_transform(u, omega), rtol=0, atol=1e-9)


def test_flow_float32_and_prior():
    lat = Lattice((4, 4))
    torch.manual_seed(0)
    model = make_sun_spectral_flow(lat, 3, 8, hidden=(4,), n_bins=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    u, log_q = model.sample(4, g)
    assert u.dtype == torch.complex64 and log_q.dtype == torch.float32 and log_q.shape == (4,)
    assert torch.isfinite(log_q).all()
    eye = torch.eye(3, dtype=torch.complex64)
    torch.testing.assert_close(u @ dagger(u), eye.expand_as(u), rtol=0, atol=1e-5)
    # the inverse pass gives the same density (FlowModel.log_prob; .real: its accumulator follows x's dtype)
    model64 = make_sun_spectral_flow(lat, 3, 8, hidden=(4,), n_bins=4)
    u64, log_q64 = model64.sample(3, g)
    torch.testing.assert_close(model64.log_prob(u64).real, log_q64, rtol=0, atol=1e-9)
    prior = SUNHaarPrior(lat, 3)
    z, log_r = prior.sample(2, torch.Generator().manual_seed(2))
    assert z.shape == (2, 2, 4, 4, 3, 3) and z.dtype == C128 and bool((log_r == 0).all())
    zero = make_sun_spectral_flow(lat, 2, 8, hidden=(4,), zero_init=True)
    z, _ = zero.prior.sample(2, torch.Generator().manual_seed(3))
    out, lj = zero.forward_from(z, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(out, z, rtol=0, atol=1e-12)
    torch.testing.assert_close(lj, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- physics


@pytest.mark.statistical
def test_trained_su3_flow_mcmc_reproduces_exact_plaquette():
    """2D SU(3), 4x4, beta = 2: reverse-KL training lifts the ESS far above Haar, and flow-MCMC gives
    the exact torus plaquette (character expansion) within 3 sigma (Gamma-method error)."""
    lat, beta = Lattice((4, 4)), 2.0
    seed = stat_seed(7100)
    torch.manual_seed(seed)
    model = make_sun_spectral_flow(lat, 3, 8, hidden=(8,), kernel_size=3, n_bins=6, zero_init=True)
    g = torch.Generator().manual_seed(seed + 1)

    def log_p(u):
        return -wilson_action(u, beta)

    # ESS of Haar proposals, exactly: <e^{-2S}> / <e^{-S}>^2 = Z(2 beta) / Z(beta)^2 (Haar probability measure);
    # a sample estimate is heavy-tailed (0.004 to 0.12 over seeds at 512 draws)
    ess_haar = math.exp(2 * exact_log_z(beta, 3, (4, 4)) - exact_log_z(2 * beta, 3, (4, 4)))
    assert ess_haar < 0.02
    trainer = ReverseKLTrainer(model, log_p, batch_size=32, lr=1e-2, generator=g)
    for _ in range(40):
        trainer.train_step()
    with torch.no_grad():
        u, log_q = model.sample(512, g)
        ess_flow = ess_per_config(log_p(u) - log_q)
    assert ess_flow > 0.4, (ess_flow, ess_haar)  # 0.66-0.68 at seed offsets 0, 1
    chain = FlowMCMC(model, log_p, batch_size=500, generator=g)
    chain.run(100)
    block = chain.run(3000)
    plaq = plaquette_mean(block.x).numpy()
    res = gamma_method(plaq)
    exact = exact_plaquette(beta, 3, (4, 4))
    z_score = (res.mean - exact) / res.err
    assert abs(z_score) < 3, (res.mean, res.err, exact)
    assert float(np.mean(block.accepted.numpy())) > 0.3


def test_conv4d_init_matches_4d_fan_in():
    # k Conv3d slices summed must start like one 4D convolution (fan-in c_in k^4), not sqrt(k) larger
    from latflow.flows.nets import PeriodicConvNet

    torch.manual_seed(0)
    c_in, k = 12, 3
    net = PeriodicConvNet(4, c_in, 26, (8,), kernel_size=k)
    bound = (c_in * k**4) ** -0.5  # torch's default uniform bound 1 / sqrt(fan_in), weights and bias
    first = net.net[0]
    w = torch.cat([c.weight.detach().flatten() for c in first.convs])
    assert float(w.abs().max()) <= bound
    assert float(w.abs().max()) > 0.99 * bound
    assert float(first.convs[0].bias.detach().abs().max()) <= bound


def test_4d_su3_flow_reparameterised_gradient_matches_finite_differences():
    # d/d theta mean(log q - log p) through sampling, 4D SU(3), random weights: autograd vs central differences
    lat = Lattice((2, 2, 2, 4))
    torch.manual_seed(3)
    model = make_sun_spectral_flow(lat, 3, 3, hidden=(4,), kernel_size=3, n_bins=4)
    params = list(model.parameters())

    def loss() -> torch.Tensor:
        u, log_q = model.sample(2, torch.Generator().manual_seed(11))
        return (log_q + wilson_action(u, 0.5)).mean()

    grads = torch.autograd.grad(loss(), params)
    g = torch.Generator().manual_seed(12)
    eps = 1e-5
    for _ in range(3):
        dirs = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        exact = sum(float((gr * dr).sum()) for gr, dr in zip(grads, dirs))
        with torch.no_grad():
            for p, dr in zip(params, dirs):
                p.add_(eps * dr)
            up = float(loss())
            for p, dr in zip(params, dirs):
                p.sub_(2 * eps * dr)
            down = float(loss())
            for p, dr in zip(params, dirs):
                p.add_(eps * dr)
        fd = (up - down) / (2 * eps)
        assert abs(fd - exact) < 1e-6 * max(1.0, abs(fd)), (exact, fd)
