"""Fused compiled staggered apply (latflow.fermions.staggered_kernels) against the torch reference."""

import pytest
import torch

from latflow.fermions.staggered import StaggeredDirac
from latflow.fermions.staggered_kernels import compiled_staggered_available, staggered_apply
from latflow.lattice import Lattice
from latflow.sun import haar_sun

SHAPES = [(4, 6), (3, 4, 2, 5)]  # d = 2 and 4, non-square
RTOL = {torch.complex128: 1e-12, torch.complex64: 1e-5}
REAL = {torch.complex128: torch.float64, torch.complex64: torch.float32}


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.delenv("LATFLOW_KERNELS", raising=False)
    if not compiled_staggered_available():
        pytest.skip("the staggered_hop kernel does not build on this machine (no C++ compiler?)")


def _setup(shape, n_colors, yukawa, dtype, batch, seed=0, antiperiodic=True):
    """``(dirac, background, psi)`` with random links, scalar and spinor."""
    g = torch.Generator().manual_seed(seed)
    dirac = StaggeredDirac(Lattice(shape), 0.37, yukawa, n_colors=n_colors, antiperiodic_time=antiperiodic)
    sigma = torch.randn((batch, *shape), generator=g, dtype=torch.float64)
    d = len(shape)
    if n_colors is None:
        links = None
    elif n_colors == 1:
        phase = torch.randn((batch, d, *shape), generator=g, dtype=torch.float64).to(REAL[dtype])
        links = torch.polar(torch.ones_like(phase), phase)
    else:
        links = haar_sun((batch, d, *shape), n_colors, g, dtype=dtype)
    if links is None:
        x = sigma
    elif yukawa == 0.0:
        x = links
    else:
        x = (links, sigma)
    psi = torch.randn((batch, *dirac.field_shape), generator=g, dtype=dtype)
    return dirac, x, psi


def _close(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert (got - ref).abs().max().item() <= RTOL[ref.dtype] * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "n_colors,yukawa", [(None, 0.0), (None, 0.8), (1, 0.0), (1, 0.8), (2, 0.0), (3, 0.0), (3, 0.8)]
)
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
@pytest.mark.parametrize("batch", [1, 3])
def test_apply_matches_torch(shape, n_colors, yukawa, dtype, batch):
    dirac, x, psi = _setup(shape, n_colors, yukawa, dtype, batch)
    assert staggered_apply(dirac, x, psi, sign=1.0, with_mass=True) is not None  # the kernel path is taken
    hop = dirac.hop_reference(x, psi)
    diag = dirac._diag(x, psi)
    _close(dirac.hop(x, psi), hop)
    _close(dirac.apply(x, psi), hop + diag)
    _close(dirac.apply_dagger(x, psi), diag - hop)
    y = hop + diag
    _close(dirac.apply_normal(x, psi), dirac._diag(x, y) - dirac.hop_reference(x, y))


@pytest.mark.parametrize("n_colors", [None, 3])
def test_periodic_time(n_colors):
    dirac, x, psi = _setup((4, 6), n_colors, 0.0, torch.complex128, 2, antiperiodic=False)
    _close(dirac.hop(x, psi), dirac.hop_reference(x, psi))


def test_two_threads_equal_one_thread():
    dirac, x, psi = _setup((4, 4, 6, 4), 3, 0.0, torch.complex128, 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dirac.apply(x, psi)
        torch.set_num_threads(2)
        a = torch.randn(64, 64, dtype=torch.float64)
        ab = a @ a
        two = dirac.apply(x, psi)
        assert torch.equal(a @ a, ab)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_kernels_off_gives_the_torch_path(monkeypatch):
    monkeypatch.setenv("LATFLOW_KERNELS", "off")
    dirac, x, psi = _setup((4, 6), 1, 0.0, torch.complex128, 2)
    assert staggered_apply(dirac, x, psi, sign=1.0, with_mass=True) is None
    assert torch.equal(dirac.hop(x, psi), dirac.hop_reference(x, psi))
    assert torch.equal(dirac.apply(x, psi), dirac.hop_reference(x, psi) + dirac._diag(x, psi))


def test_conjugate_views():
    dirac, x, psi = _setup((4, 6), 3, 0.0, torch.complex128, 2)
    psi_c, x_c = psi.conj(), x.conj()
    assert psi_c.is_conj() and x_c.is_conj()
    _close(dirac.apply(x_c, psi_c), dirac.hop_reference(x_c, psi_c) + dirac._diag(x_c, psi_c))


def test_autograd_real_spinors_and_d1_fall_back():
    dirac, sigma, psi = _setup((4, 6), None, 0.8, torch.complex128, 2)
    sigma = sigma.clone().requires_grad_(True)
    assert staggered_apply(dirac, sigma, psi, sign=1.0, with_mass=True) is None
    assert dirac.apply(sigma, psi).grad_fn is not None
    real = torch.randn(2, 4, 6, dtype=torch.float64)
    assert staggered_apply(dirac, sigma.detach(), real, sign=1.0, with_mass=False) is None
    one_d = StaggeredDirac(Lattice((6,)), 0.1)
    assert (
        staggered_apply(one_d, torch.zeros(1, 6), torch.zeros(1, 6, dtype=torch.complex128), sign=1.0, with_mass=False)
        is None
    )
