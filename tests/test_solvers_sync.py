"""Device-scalar Krylov solvers: periodic convergence checks, masks, host syncs, mixed precision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from latflow.fermions import WilsonDirac, solvers, u1_links
from latflow.fermions.solvers import ConvergenceError, bicgstab, cg, cg_mixed, cgnr, solve_normal
from latflow.lattice import Lattice
from latflow.sun import haar_sun

SYNC_METHODS = {"__bool__", "item", "cpu", "numpy", "tolist", "__float__", "__int__", "__index__"}


@pytest.fixture(autouse=True)
def device_scalar_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the device-scalar solvers (the GPU path): keep ``cg`` off the CPU host-scalar path
    (:mod:`latflow.fermions.cg_cpu`, tested in ``test_cg_cpu.py``)."""
    monkeypatch.setattr(solvers.cg_cpu, "usable", lambda b, x0: False)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def u1_setup(kappa: float = 0.26, batch: int = 3, L: int = 8, seed: int = 5):
    """Wilson operator, U(1) links ``[batch, 2, L, L]`` and a Gaussian spinor ``[batch, L, L, 2]``."""
    g = gen(seed)
    op = WilsonDirac(Lattice((L, L)), kappa)
    U = u1_links(2 * math.pi * torch.rand((batch, 2, L, L), generator=g, dtype=torch.float64))
    return op, U, op.gaussian(batch, g)


def su3_setup(kappa: float = 0.12, batch: int = 2, L: int = 2, seed: int = 6):
    """Wilson operator, Haar SU(3) links ``[batch, 4, L, L, L, L, 3, 3]`` and a spinor, 4D."""
    g = gen(seed)
    op = WilsonDirac(Lattice((L,) * 4), kappa, n_colors=3)
    U = haar_sun((batch, 4) + (L,) * 4, 3, g)
    return op, U, op.gaussian(batch, g)


def reference_cg(apply_A, b: torch.Tensor, tol: float, max_iter: int) -> tuple[torch.Tensor, np.ndarray]:
    """Textbook batched CG with host (numpy) scalars and a check every iteration: the former implementation, with
    ``Re <a, c>`` as the real dot product of the (re, im) pairs, as the solver computes it."""

    def dot(a: torch.Tensor, c: torch.Tensor) -> np.ndarray:
        a, c = torch.view_as_real(a).flatten(1), torch.view_as_real(c).flatten(1)
        return torch.linalg.vecdot(a, c, dim=-1).numpy()

    shape = (-1,) + (1,) * (b.dim() - 1)
    denom = np.sqrt(dot(b, b))
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), dot(r, r)
    its = np.zeros(b.shape[0], dtype=np.int64)
    active = np.sqrt(rr) / denom >= tol
    for _ in range(max_iter):
        if not active.any():
            break
        ap = apply_A(p)
        alpha = np.where(active, rr / dot(p, ap), 0.0)
        x = x + torch.as_tensor(alpha).view(shape) * p
        r = r - torch.as_tensor(alpha).view(shape) * ap
        rr_new = dot(r, r)
        p = r + torch.as_tensor(np.where(active, rr_new / rr, 0.0)).view(shape) * p
        rr = np.where(active, rr_new, rr)
        its += active
        active &= np.sqrt(rr) / denom >= tol
    return x, its


class SyncCounter(TorchFunctionMode):
    """Counts tensor methods that move data to the host (``bool(t)``, ``t.item()``, ``t.cpu()``, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNC_METHODS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_check_every_1_matches_former_cg() -> None:
    op, U, b = u1_setup()
    A = lambda v: op.apply_normal(U, v)  # noqa: E731
    res = cg(A, b, tol=1e-10, check_every=1)
    x_ref, its_ref = reference_cg(A, b, 1e-10, 1000)
    assert res.iterations.tolist() == its_ref.tolist()
    torch.testing.assert_close(res.x, x_ref, rtol=1e-12, atol=1e-12)
    # the CPU default is check_every = 1
    res_default = cg(A, b, tol=1e-10)
    assert torch.equal(res_default.x, res.x) and torch.equal(res_default.iterations, res.iterations)


@pytest.mark.parametrize("k", [3, 10])
def test_check_every_k_reaches_tol_with_same_iterations(k: int) -> None:
    op, U, b = u1_setup(kappa=0.27)
    A = lambda v: op.apply_normal(U, v)  # noqa: E731
    ref = cg(A, b, tol=1e-10, check_every=1)
    res = cg(A, b, tol=1e-10, check_every=k)
    true = (b - A(res.x)).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)
    assert bool((true < 1e-10).all()) and bool((res.residual < 1e-10).all())
    assert bool((res.iterations <= ref.iterations + k - 1).all())
    # frozen systems make no extra steps: same counts, same solution bit for bit
    assert torch.equal(res.iterations, ref.iterations) and torch.equal(res.x, ref.x)
    # CGNR on D itself, likewise
    D, Dd = (lambda v: op.apply(U, v)), (lambda v: op.apply_dagger(U, v))
    r1, rk = cgnr(D, Dd, b, tol=1e-10, check_every=1), cgnr(D, Dd, b, tol=1e-10, check_every=k)
    assert bool((rk.residual < 1e-10).all()) and torch.equal(rk.iterations, r1.iterations)
    torch.testing.assert_close(rk.x, r1.x, rtol=0, atol=0)
    # BiCGStab on D, likewise
    b1, bk = bicgstab(D, b, tol=1e-10, check_every=1), bicgstab(D, b, tol=1e-10, check_every=k)
    assert bool((bk.residual < 1e-10).all()) and torch.equal(bk.iterations, b1.iterations)
    torch.testing.assert_close(bk.x, b1.x, rtol=0, atol=0)


def test_masks_freeze_the_converged_system() -> None:
    """One easy and one hard diagonal system: the easy one stops early and its x stays put between checks."""
    lam = torch.stack([torch.linspace(1, 2, 60), torch.logspace(-4, 0, 60)]).to(torch.float64)
    rhs = torch.ones(2, 60, dtype=torch.float64)
    n_apply = [0]

    def A(v: torch.Tensor) -> torch.Tensor:
        n_apply[0] += 1
        return lam * v

    res = cg(A, rhs, tol=1e-12, check_every=10)
    solo = cg(lambda v: lam[:1] * v, rhs[:1], tol=1e-12, check_every=1)
    its = res.iterations.tolist()
    assert its[0] == int(solo.iterations[0]) < its[1]
    assert torch.equal(res.x[0], solo.x[0])
    torch.testing.assert_close(res.x, rhs / lam, rtol=1e-10, atol=0)
    # products with A: the iterations of the slowest system, at most 9 no-op ones, the true residual and the final one
    assert its[1] + 2 <= n_apply[0] <= its[1] + 9 + 2


@pytest.mark.parametrize("k", [1, 4, 10])
def test_host_syncs_only_at_periodic_checks(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    op, U, b = u1_setup(kappa=0.25)
    A = lambda v: op.apply_normal(U, v)  # noqa: E731
    checks = [0]
    sync_any = solvers._sync_any

    def counting(mask: torch.Tensor) -> bool:
        checks[0] += 1
        return sync_any(mask)

    monkeypatch.setattr(solvers, "_sync_any", counting)
    with SyncCounter() as counter:
        res = cg(A, b, tol=1e-10, check_every=k)
    n = int(res.iterations.max())
    # checks of "any system active" at n = 0, k, 2k, ... up to the first multiple of k >= n, plus the true-residual one
    assert checks[0] == math.ceil(n / k) + 2
    # every host transfer is one of those checks, bar a fixed few in setup and _finish
    assert checks[0] <= counter.count <= checks[0] + 4, (counter.count, checks[0])
    assert n > 30  # a real test: many iterations, few syncs when k > 1


def test_mixed_precision_matches_double_u1_and_su3() -> None:
    for op, U, b in (u1_setup(kappa=0.26), su3_setup()):
        ref = solve_normal(op, U, b, tol=1e-11)
        for k in (1, 10):
            res = solve_normal(op, U, b, solver="cg_mixed", tol=1e-11, check_every=k)
            assert res.x.dtype == b.dtype
            true = (b - op.apply_normal(U, res.x)).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)
            assert bool((true < 1e-11).all()), true
            torch.testing.assert_close(res.residual, true, rtol=1e-6, atol=1e-16)
            err = (res.x - ref.x).flatten(1).norm(dim=1) / ref.x.flatten(1).norm(dim=1)
            assert bool((err < 1e-8).all()), err
            assert bool((res.iterations > 0).all())


def test_mixed_precision_refuses_what_it_cannot_reach() -> None:
    op, U, b = u1_setup(kappa=0.26)
    with pytest.raises(ValueError, match="cg_mixed: tol"):
        solve_normal(op, U, b, solver="cg_mixed", tol=1e-17)
    with pytest.raises(ValueError, match="inner_tol"):
        solve_normal(op, U, b, solver="cg_mixed", inner_tol=1e-9)
    with pytest.raises(ConvergenceError, match="cg_mixed.*max_iter=20"):
        solve_normal(op, U, b, solver="cg_mixed", tol=1e-12, max_iter=20)
    # an inner operator that cannot reduce the residual: defect correction stagnates and says so
    lam = torch.logspace(-4, 0, 40, dtype=torch.float64).expand(2, 40)
    rhs = torch.ones(2, 40, dtype=torch.float64)
    with pytest.raises(ConvergenceError, match="stagnated") as info:
        cg_mixed(lambda v: (lam.float() + 1) * v, lambda v: lam * v, rhs, tol=1e-10)
    assert info.value.result.x.dtype == torch.float64


def test_convergence_errors_with_periodic_checks() -> None:
    op, U, b = u1_setup(kappa=0.26, batch=2)
    A = lambda v: op.apply_normal(U, v)  # noqa: E731
    for k in (1, 10):
        with pytest.raises(ConvergenceError, match="cg.*max_iter=5") as info:
            cg(A, b, tol=1e-10, max_iter=5, check_every=k)
        assert info.value.result.iterations.tolist() == [5, 5]
    # singular (b outside the range of A) and indefinite systems
    lam = torch.tensor([[0.0] + [1.0] * 9, [-1.0] + [1.0] * 9], dtype=torch.float64)
    with pytest.raises(ConvergenceError, match="breakdown or non-finite"):
        cg(lambda v: lam * v, torch.ones(2, 10, dtype=torch.float64), check_every=10)


def test_check_every_defaults_and_bad_input() -> None:
    b = torch.ones(2, 3)
    assert solvers._resolve_check_every("cg", None, b) == 1
    assert solvers._resolve_check_every("cg", None, torch.ones(2, 3, device="meta")) == 10
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="cg: check_every must be a positive integer"):
            cg(lambda v: v, b, check_every=bad)
    op, U, rhs = u1_setup(batch=1, L=4)
    with pytest.raises(ValueError, match="solver must be one of 'cg', 'cg_mixed'"):
        solve_normal(op, U, rhs, solver="gmres")
