"""Fused compiled Wilson gauge forces (latflow.gauge_kernels) against the torch references."""

import pytest
import torch

from latflow import gauge_kernels
from latflow.gauge_kernels import compiled_force_available, sun_wilson_force, u1_wilson_force
from latflow.lattice import Lattice
from latflow.manifolds import SUN
from latflow.sun import haar_sun, sun_staples, traceless_antihermitian, wilson_action
from theories.su3_nf2 import SUNNf2Model, SUNNf2Params
from theories.u1 import U1GaugeAction, U1Params

SHAPES = [(4, 6), (3, 4, 2, 5)]  # d = 2 and 4, non-square (an extent 2 and odd extents included)
REAL = [torch.float64, torch.float32]
COMPLEX = [torch.complex128, torch.complex64]
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.complex128: 1e-12, torch.complex64: 1e-5}


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.delenv("LATFLOW_KERNELS", raising=False)
    if not compiled_force_available():
        pytest.skip("the gauge_force kernel does not build on this machine (no C++ compiler?)")


def _angles(batch, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand((batch, len(shape), *shape), generator=g, dtype=torch.float64) * 2 - 1) * 3.2).to(dtype)


def _links(batch, shape, n, dtype, seed=0):
    return haar_sun((batch, len(shape), *shape), n, torch.Generator().manual_seed(seed), dtype=dtype)


def _close(got, ref):
    assert got is not None and got.dtype == ref.dtype and got.shape == ref.shape
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= RTOL[ref.dtype] * max(scale, 1.0)


def _sun_reference(u, beta):
    n = u.shape[-1]
    staples = torch.stack([sun_staples(u, mu) for mu in range(u.shape[1])], dim=1)
    return (0.5 * beta / n) * traceless_antihermitian(u @ staples)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", REAL)
@pytest.mark.parametrize("batch", [1, 3])
def test_u1_force_matches_torch(shape, dtype, batch):
    action = U1GaugeAction(U1Params(1.7), Lattice(shape))
    theta = _angles(batch, shape, dtype)
    _close(action.force(theta), action.force_reference(theta))
    _close(u1_wilson_force(theta, 1.7), action.force_reference(theta))


@pytest.mark.parametrize("shape", [(7, 10), (3, 4, 2, 5)])
@pytest.mark.parametrize("dtype", REAL)
def test_u1_streaming_kernel_gives_the_same_bits(shape, dtype):
    """The one-sweep U(1) kernel (used for large lattices) equals the two-sweep one bit for bit."""
    lib = gauge_kernels._library()
    theta = _angles(3, shape, dtype)
    two_sweeps = u1_wilson_force(theta, 1.7)
    previous = lib.latflow_u1_force_scratch_limit(0)
    try:
        one_sweep = u1_wilson_force(theta, 1.7)
        torch.set_num_threads(2)
        one_sweep_2 = u1_wilson_force(theta, 1.7)
    finally:
        torch.set_num_threads(1)
        lib.latflow_u1_force_scratch_limit(previous)
    assert torch.equal(one_sweep, two_sweeps) and torch.equal(one_sweep_2, two_sweeps)


@pytest.mark.parametrize("shape", SHAPES)
def test_u1_force_is_the_action_gradient(shape):
    """An independent reference: autograd of the Wilson action through the complex links (N = 1)."""
    theta = _angles(2, shape, torch.float64, seed=3).requires_grad_(True)
    u = torch.polar(torch.ones_like(theta), theta)[..., None, None]
    (grad,) = torch.autograd.grad(wilson_action(u, 1.7).sum(), theta)
    _close(u1_wilson_force(theta.detach(), 1.7), grad)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("dtype", COMPLEX)
@pytest.mark.parametrize("batch", [1, 3])
def test_sun_force_matches_torch(shape, n, dtype, batch):
    u = _links(batch, shape, n, dtype)
    _close(sun_wilson_force(u, 2.3), _sun_reference(u, 2.3))


@pytest.mark.parametrize("shape", SHAPES)
def test_sun_force_is_the_lie_derivative(shape):
    """An independent reference: the manifold's autograd force of the Wilson action."""
    u = _links(2, shape, 3, torch.complex128, seed=5)
    _close(sun_wilson_force(u, 2.3), SUN(3).force(lambda v: wilson_action(v, 2.3), u))


@pytest.mark.parametrize("shape", SHAPES)
def test_theory_gauge_force_uses_the_kernel(shape):
    model = SUNNf2Model(SUNNf2Params(beta=2.3, kappa=0.0, n=3), Lattice(shape))
    u = _links(2, shape, 3, torch.complex128, seed=7)
    fused = model.gauge_force(u)
    assert torch.equal(fused, sun_wilson_force(u, 2.3))
    _close(fused, model.gauge_force_reference(u))


def test_two_threads_equal_one_thread():
    thetas = [_angles(3, (8, 6, 4, 4), torch.float64), _angles(3, (7, 10), torch.float64)]  # odd row counts too
    u = _links(2, (4, 4, 4, 6), 3, torch.complex128)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        f1, g1 = [u1_wilson_force(t, 1.1) for t in thetas], sun_wilson_force(u, 1.1)
        torch.set_num_threads(2)
        a = torch.randn(64, 64, dtype=torch.float64)
        ab = a @ a  # torch's own threading before and after a kernel call
        f2, g2 = [u1_wilson_force(t, 1.1) for t in thetas], sun_wilson_force(u, 1.1)
        assert torch.equal(a @ a, ab)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(x, y) for x, y in zip(f1, f2)) and torch.equal(g1, g2)


def test_kernels_off_gives_the_torch_path(monkeypatch):
    monkeypatch.setenv("LATFLOW_KERNELS", "off")
    shape = (4, 6)
    theta = _angles(2, shape, torch.float64)
    assert u1_wilson_force(theta, 1.0) is None
    action = U1GaugeAction(U1Params(1.0), Lattice(shape))
    assert torch.equal(action.force(theta), action.force_reference(theta))
    u = _links(2, shape, 3, torch.complex128)
    assert sun_wilson_force(u, 1.0) is None
    model = SUNNf2Model(SUNNf2Params(beta=1.0, kappa=0.0, n=3), Lattice(shape))
    assert torch.equal(model.gauge_force(u), model.gauge_force_reference(u))


def test_autograd_and_unsupported_inputs_fall_back():
    theta = _angles(2, (4, 6, 2, 2), torch.float64).requires_grad_(True)
    assert u1_wilson_force(theta, 1.0) is None
    action = U1GaugeAction(U1Params(1.0), Lattice((4, 6, 2, 2)))
    assert action.force(theta).grad_fn is not None  # differentiable torch path (d > 2)
    with torch.no_grad():
        assert u1_wilson_force(theta, 1.0) is not None
    assert u1_wilson_force(_angles(2, (4, 6), torch.float16), 1.0) is None
    assert sun_wilson_force(_links(1, (4, 4), 4, torch.complex128), 1.0) is None  # N = 4 not compiled
    # non-contiguous links and lazy conjugate / negative views are copied, not refused or misread
    u = _links(2, (4, 6), 3, torch.complex128).contiguous()
    ut = u.transpose(-1, -2).conj()
    assert not ut.is_contiguous()
    _close(sun_wilson_force(ut, 1.0), _sun_reference(ut, 1.0))
    uc = u.conj()
    assert uc.is_conj() and uc.is_contiguous()
    _close(sun_wilson_force(uc, 1.0), _sun_reference(uc.resolve_conj(), 1.0))
    theta = -_angles(2, (4, 6), torch.float64)
    _close(u1_wilson_force(theta, 1.0), U1GaugeAction(U1Params(1.0), Lattice((4, 6))).force_reference(theta))
