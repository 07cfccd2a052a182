"""Flow layers, flow model, prior and lattice geometry of the engine.

- the shared flow-layer contract (``layer_contract`` in conftest.py) on every ``AffineCoupling``
  (d = 1, 2, 3; both parities; with and without tanh; random non-zero weights) and on the whole
  stack of a ``FlowModel``;
- ``FlowModel``: ``log_prob(sample) == log_q``, ``log_q`` against the prior density and the autograd
  Jacobian, seeded reproducibility;
- ``NormalPrior``: the normalised Gaussian density;
- ``Lattice`` and ``shift``: the shift convention, checkerboard masks, odd extents.

Everything is float64 and seeded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import stat_seed
from scipy import integrate
from torch import nn

from latflow.flows import AffineCoupling, FlowModel, PeriodicConvNet, make_affine_flow
from latflow.lattice import Lattice, shift
from latflow.priors import NormalPrior
from latflow.rng import make_generator

F64 = torch.float64


def randomize_(module: nn.Module, gain: float, seed: int) -> nn.Module:
    """Seeded random weights ``N(0, gain^2 / fan_in)`` and biases ``N(0, 0.3^2)``: no layer is (near)
    the identity, and the test does not depend on the global torch seed of the default initialisation."""
    g = make_generator(seed, 7)
    with torch.no_grad():
        for p in module.parameters():
            std = gain / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.3
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def field(shape: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    return torch.randn((batch, *shape), generator=make_generator(seed), dtype=F64)


class Stack(nn.Module):
    """The layers of a flow model as one layer (forward through all, reverse in reverse order)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros(x.shape[0], dtype=x.dtype)
        for layer in self.layers:
            x, ld = layer(x)
            total = total + ld
        return x, total

    def reverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros(y.shape[0], dtype=y.dtype)
        for layer in reversed(self.layers):
            y, ld = layer.reverse(y)
            total = total + ld
        return y, total


# --- affine coupling -------------------------------------------------------------------------

SHAPES = [(6,), (4, 4), (2, 4), (2, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("scale_tanh", [True, False], ids=["tanh", "no-tanh"])
def test_affine_coupling_contract(shape, parity, scale_tanh, layer_contract):
    mask = Lattice(shape).checkerboard(parity)
    layer = AffineCoupling(mask, hidden=(4, 4), scale_tanh=scale_tanh).to(F64)
    randomize_(layer, 1.5, seed=len(shape) * 10 + parity)
    x = field(shape, 3, seed=1)
    y, log_j = layer_contract(layer, x)
    # frozen sites pass through exactly; the active ones moved
    frozen = mask.bool()
    assert torch.equal(y[:, frozen], x[:, frozen])
    assert (y[:, ~frozen] - x[:, ~frozen]).abs().min() > 0
    # logJ depends only on the frozen sites
    x2 = x.clone()
    x2[:, ~frozen] += 1.0
    assert torch.equal(layer(x2)[1], log_j)


def test_zero_init_coupling_is_the_identity():
    layer = AffineCoupling(Lattice((4, 4)).checkerboard(0), hidden=(4,), zero_init=True).to(F64)
    x = field((4, 4), 2, seed=2)
    y, log_j = layer(x)
    assert torch.equal(y, x) and torch.equal(log_j, torch.zeros(2, dtype=F64))


def test_the_contract_helper_catches_a_wrong_log_det(layer_contract):
    """The shared helper itself has teeth: a layer that misreports logJ by a constant fails it."""

    class Wrong(AffineCoupling):
        def forward(self, x):
            y, ld = super().forward(x)
            return y, ld + 1e-6

    layer = randomize_(Wrong(Lattice((4, 4)).checkerboard(0), hidden=(4,)).to(F64), 1.5, seed=3)
    with pytest.raises(AssertionError):
        layer_contract(layer, field((4, 4), 2, seed=3))


def test_periodic_conv_net_is_translation_equivariant():
    net = randomize_(PeriodicConvNet(2, 1, 2, (4,), 3).to(F64), 1.5, seed=4)
    x = field((1, 4, 6), 2, seed=4)
    rolled = torch.roll(x, shifts=(1, 2), dims=(2, 3))
    torch.testing.assert_close(net(rolled), torch.roll(net(x), shifts=(1, 2), dims=(2, 3)), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        PeriodicConvNet(5, 1, 2, (4,))
    # d = 4 (no torch Conv4d: a sum of Conv3d slices) is translation equivariant in all four directions too
    net4 = randomize_(PeriodicConvNet(4, 1, 2, (3,), 3).to(F64), 1.5, seed=5)
    x4 = field((1, 4, 2, 6, 4), 2, seed=5)
    shifts = (1, 1, 3, 2)
    torch.testing.assert_close(
        net4(torch.roll(x4, shifts=shifts, dims=(2, 3, 4, 5))),
        torch.roll(net4(x4), shifts=shifts, dims=(2, 3, 4, 5)),
        rtol=0,
        atol=1e-12,
    )
    with pytest.raises(ValueError):
        PeriodicConvNet(2, 1, 2, (4,), kernel_size=2)


# --- flow model ----------------------------------------------------------------------------


@pytest.fixture
def model() -> FlowModel:
    m = make_affine_flow(Lattice((4, 4)), n_layers=4, hidden=(4,), prior_sigma=0.7)
    return randomize_(m, 1.0, seed=5)


def test_make_affine_flow_structure(model):
    assert all(p.dtype == F64 for p in model.parameters())
    masks = [layer.mask for layer in model.layers]
    assert len(masks) == 4 and all(m.dtype == F64 for m in masks)
    for i, m in enumerate(masks):
        torch.testing.assert_close(m, Lattice((4, 4)).checkerboard(i % 2, dtype=F64))
    with pytest.raises(ValueError):
        make_affine_flow(Lattice((3, 4)), 2, (4,))


def test_flow_model_layers_obey_the_contract(model, layer_contract):
    layer_contract(Stack(model.layers), field((4, 4), 3, seed=6))


def test_flow_model_log_q(model):
    g = make_generator(8)
    x, log_q = model.sample(5, g)
    assert x.shape == (5, 4, 4) and log_q.shape == (5,) and x.dtype == F64
    # the inverse pass gives the density of the sample
    torch.testing.assert_close(model.log_prob(x), log_q, rtol=0, atol=1e-10)
    # log q(x) = log r(z) - log|det dx/dz|, with the Jacobian from autograd
    z, log_r = model.prior.sample(3, make_generator(9))
    x, log_q = model.forward_from(z, log_r)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(
            lambda v: model.forward_from(v.reshape(1, 4, 4), torch.zeros(1, dtype=F64))[0].reshape(-1),
            z[i].reshape(-1),
        )
        expected = model.prior.log_prob(z[i : i + 1])[0] - torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(log_q[i], expected, rtol=0, atol=1e-10)


def test_flow_model_sampling_is_seeded(model):
    a = model.sample(4, make_generator(11))
    b = model.sample(4, make_generator(11))
    c = model.sample(4, make_generator(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_log_prob_is_normalised_on_two_sites():
    """A two-site flow (one frozen, one active site): ``int q(x) dx = 1`` by quadrature."""
    layer = AffineCoupling(torch.tensor([1.0, 0.0]), hidden=(3,), kernel_size=3).to(F64)
    randomize_(layer, 1.5, seed=13)
    model = FlowModel(NormalPrior((2,), 0.8), [layer])
    pts = torch.tensor([[0.3, -0.5], [1.0, 2.0]], dtype=F64)
    assert (model.log_prob(pts) - NormalPrior((2,), 0.8).log_prob(pts)).abs().min() > 1e-3  # not a Gaussian

    # trapezoid rule on a uniform grid: spectrally accurate for a smooth density that decays fast
    t = torch.linspace(-16, 16, 801, dtype=F64)
    grid = torch.cartesian_prod(t, t)
    with torch.no_grad():
        q = model.log_prob(grid).exp().reshape(801, 801)
    total = torch.trapezoid(torch.trapezoid(q, t, dim=1), t).item()
    assert total == pytest.approx(1.0, abs=1e-9)


# --- prior -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
def test_normal_prior_density(sigma):
    prior = NormalPrior((3, 2), sigma)
    z, log_r = prior.sample(4, make_generator(14))
    assert z.shape == (4, 3, 2) and z.dtype == F64
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(sigma, dtype=F64))
    ref = normal.log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(log_r, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(prior.log_prob(z), ref, rtol=0, atol=1e-12)
    one = NormalPrior((1,), sigma)
    total, _ = integrate.quad(lambda t: math.exp(one.log_prob(torch.tensor([[t]], dtype=F64)).item()), -np.inf, np.inf)
    assert total == pytest.approx(1.0, abs=1e-9)


@pytest.mark.statistical
def test_normal_prior_samples_have_the_stated_width(record_z):
    sigma = 0.6
    z, _ = NormalPrior((100,), sigma).sample(200, make_generator(stat_seed(15)))
    n = z.numel()
    var = z.var().item()  # 20000 draws: relative error of the variance sqrt(2/(N-1)) = 1%
    z_var = (var / sigma**2 - 1) / math.sqrt(2 / (n - 1))
    z_mean = z.mean().item() / (sigma / math.sqrt(n))
    record_z("variance", z_var, 4.0)
    record_z("mean", z_mean, 4.0)
    assert abs(z_var) < 4 and abs(z_mean) < 4, (z_var, z_mean)
    with pytest.raises(ValueError):
        NormalPrior((2,), 0.0)


# --- lattice ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4)], ids=lambda s: "x".join(map(str, s)))
def test_shift_convention(shape):
    """``shift(x, mu, step)[x] == x[x + step mu]`` (periodic), also with a field axis before the lattice."""
    x = field(shape, 2, seed=16).numpy()
    for mu in range(len(shape)):
        for step in (1, -1, 2):
            y = shift(torch.from_numpy(x), mu, step).numpy()
            for site in np.ndindex(*shape):
                nb = list(site)
                nb[mu] = (nb[mu] + step) % shape[mu]
                assert np.array_equal(y[(slice(None), *site)], x[(slice(None), *nb)])
        back = shift(shift(torch.from_numpy(x), mu, 1), mu, -1)
        assert np.array_equal(back.numpy(), x)
    links = torch.from_numpy(np.stack([x, 2 * x], axis=1))  # [B, 2, *shape]: lattice starts at axis 2
    for mu in range(len(shape)):
        ref = shift(torch.from_numpy(x), mu, 1)
        assert torch.equal(shift(links, mu, 1, first_axis=2)[:, 1], 2 * ref)


@pytest.mark.parametrize("shape", [(6,), (4, 2), (2, 4, 6)], ids=lambda s: "x".join(map(str, s)))
def test_checkerboards_partition_the_lattice(shape):
    lat = Lattice(shape)
    even, odd = lat.checkerboard(0), lat.checkerboard(1)
    assert even.dtype == torch.bool and even.shape == shape
    assert not (even & odd).any() and (even | odd).all()
    assert int(even.sum()) == int(odd.sum()) == lat.volume // 2
    assert bool(even[(0,) * len(shape)])
    for mu in range(len(shape)):  # every neighbour of an even site is odd
        assert torch.equal(shift(even, mu, 1, first_axis=0), odd)
        assert torch.equal(shift(even, mu, -1, first_axis=0), odd)
    assert torch.equal(lat.checkerboard(2), even)
    assert lat.checkerboard(1, dtype=F64).sum().item() == lat.volume / 2


def test_lattice_geometry_and_bad_extents():
    lat = Lattice((2, 3, 4))
    assert lat.dim == 3 and lat.volume == 24
    coords = lat.coordinates()
    assert torch.equal(coords[2][1, 2], torch.arange(4))
    assert torch.equal(lat.parity(), sum(coords) % 2)
    for shape in [(3, 4), (4, 5), (3,), (4, 4, 1)]:
        with pytest.raises(ValueError):
            Lattice(shape).checkerboard(0)
    for shape in [(), (0, 4), (4, -2)]:
        with pytest.raises(ValueError):
            Lattice(shape)
