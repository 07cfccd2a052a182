"""CG on the CPU with host scalars and compiled fused updates (``latflow.fermions.cg_cpu``) against the
device-scalar torch CG (the GPU path): same iterations, solutions equal to rounding, same failures."""

from __future__ import annotations

import math

import pytest
import torch

from latflow.fermions import WilsonDirac, solvers, u1_links
from latflow.fermions.evenodd import EvenOddWilson
from latflow.fermions.solvers import ConvergenceError, cg
from latflow.lattice import Lattice
from latflow.sun import haar_sun

pytestmark = pytest.mark.skipif(not solvers.cg_cpu.usable(torch.zeros(1, 2), None), reason="no compiled kernels")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def torch_cg(*args, **kw):
    """The device-scalar CG (check_every = 2 keeps it off the host path; iterations do not depend on it)."""
    return cg(*args, check_every=2, **kw)


def systems(name: str):
    g = gen(3)
    if name == "u1-eo":
        d = WilsonDirac(Lattice((8, 8)), 0.26)
        eo = EvenOddWilson(d, check_parity=False)
        U = u1_links(2 * math.pi * torch.rand((3, 2, 8, 8), generator=g, dtype=torch.float64))
        b = torch.randn((3, *eo.packed_shape), generator=g, dtype=torch.complex128)
        return (lambda v: eo.apply_normal_packed(U, v)), b
    if name == "su3-4d":
        d = WilsonDirac(Lattice((2, 2, 2, 4)), 0.12, n_colors=3)
        U = haar_sun((2, 4, 2, 2, 2, 4), 3, g)
        b = d.gaussian(2, g)
        return (lambda v: d.apply_normal(U, v)), b
    # a real SPD system, float64
    a = torch.randn((2, 40, 40), generator=g, dtype=torch.float64)
    m = a @ a.transpose(1, 2) + 0.5 * torch.eye(40, dtype=torch.float64)
    b = torch.randn((2, 40), generator=g, dtype=torch.float64)
    return (lambda v: (m @ v.unsqueeze(-1)).squeeze(-1)), b


@pytest.mark.parametrize("name", ["u1-eo", "su3-4d", "real"])
def test_host_path_equals_device_path(name: str) -> None:
    A, b = systems(name)
    ref = torch_cg(A, b, tol=1e-10)
    res = cg(A, b, tol=1e-10)
    assert torch.equal(res.iterations, ref.iterations), (res.iterations, ref.iterations)
    err = (res.x - ref.x).flatten(1).norm(dim=1) / ref.x.flatten(1).norm(dim=1)
    assert float(err.max()) < 1e-8, err
    assert bool((res.residual < 1e-10).all()) and res.residual.dtype == torch.float64
    # from a guess
    x0 = ref.x + 1e-3 * torch.randn(ref.x.shape, generator=gen(4), dtype=ref.x.dtype)
    assert torch.equal(cg(A, b, tol=1e-10, x0=x0).iterations, torch_cg(A, b, tol=1e-10, x0=x0).iterations)


def test_single_precision_and_threads() -> None:
    g = gen(5)
    d = WilsonDirac(Lattice((16, 16)), 0.2)
    eo = EvenOddWilson(d, check_parity=False)
    U = u1_links(2 * math.pi * torch.rand((2, 2, 16, 16), generator=g, dtype=torch.float64)).to(torch.complex64)
    b = torch.randn((2, *eo.packed_shape), generator=g, dtype=torch.complex64)
    A = lambda v: eo.apply_normal_packed(U, v)  # noqa: E731
    res, ref = cg(A, b, tol=1e-5), torch_cg(A, b, tol=1e-5)
    assert abs(int(res.iterations.max()) - int(ref.iterations.max())) <= 1 and res.residual.dtype == torch.float32
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        res2 = cg(A, b, tol=1e-5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(res2.x, res.x) and torch.equal(res2.iterations, res.iterations)


def test_failures_and_autograd_fall_back() -> None:
    A, b = systems("u1-eo")
    with pytest.raises(ConvergenceError, match="did not converge"):
        cg(A, b, tol=1e-10, max_iter=5)
    # not positive definite: breakdown, as on the device path
    with pytest.raises(ConvergenceError, match="breakdown or non-finite"):
        cg(lambda v: -A(v), b, tol=1e-10)
    bad = b.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ConvergenceError, match="breakdown or non-finite"):
        cg(A, bad, tol=1e-10)
    # b = 0 gives x = 0 in no iteration
    zero = cg(A, torch.zeros_like(b), tol=1e-10)
    assert int(zero.iterations.max()) == 0 and not zero.x.any()
    # an operator that builds an autograd graph takes the torch solver, whose x is differentiable
    s = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    res = cg(lambda v: s * A(v), b, tol=1e-10)
    assert res.x.requires_grad
