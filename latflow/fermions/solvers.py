"""Batched Krylov solvers: CG (Hermitian positive definite), CGNR (normal equations), BiCGStab.

A batch of ``B`` independent systems ``A x_b = b_b`` is solved together: ``apply_A`` maps
``[B, *field_shape] -> [B, *field_shape]``, and the scalars of the recursions (step lengths,
residual norms) are length-``B`` float64 / complex128 arrays held on the host (each inner product
is one transfer; the per-system bookkeeping then costs no tensor operations). A system stops
updating once its relative residual ``|b - A x| / |b|`` is below ``tol``; the others go on.
Inner products are complex, ``<a, b> = sum(conj(a) * b)`` over all non-batch axes.

When every system has converged by its recursively updated residual, the true residual
``b - A x`` is computed; systems whose true residual is still above ``tol`` (rounding drift)
restart from it. The reported ``residual`` is always the true relative residual, and
``iterations`` counts the iterations each system took part in (per iteration CG applies ``A``
once, CGNR ``A`` and ``A^dagger`` once each, BiCGStab ``A`` twice). ``b = 0`` gives ``x = 0``.
A system that has not converged after ``max_iter`` iterations, or whose recursion broke down,
makes the solver raise :class:`ConvergenceError`, which carries the partial result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["SolverResult", "ConvergenceError", "cg", "cgnr", "bicgstab"]

Operator = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SolverResult:
    """Solution of a batch of linear systems.

    Attributes
    ----------
    x
        Solutions ``[B, *field_shape]``.
    iterations
        ``[B]`` int64, iterations each system took.
    residual
        ``[B]`` real, true relative residual ``|b - A x| / |b|`` (``|b - A x|`` where ``b = 0``).
    """

    x: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor


class ConvergenceError(RuntimeError):
    """A Krylov solver missed its tolerance; ``result`` holds the partial :class:`SolverResult`."""

    def __init__(self, solver: str, tol: float, max_iter: int, result: SolverResult, reason: str = "") -> None:
        res = result.residual
        bad = ~(res < tol)
        worst = float(res.max()) if res.numel() else float("nan")
        if torch.isnan(res).any():
            worst = float("nan")
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"{solver} did not converge: tol={tol:g}, max_iter={max_iter}, worst relative residual {worst:.3e}, "
            f"{int(bad.sum())} of {res.numel()} systems unconverged{why}"
        )
        self.solver = solver
        self.tol = tol
        self.max_iter = max_iter
        self.result = result


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b> = sum(conj(a) b)`` over all non-batch axes, ``[B]`` (on the device)."""
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1), dim=-1)


def _host(t: torch.Tensor) -> np.ndarray:
    """A ``[B]`` tensor as a float64 / complex128 numpy array (the recursion scalars live on the host)."""
    t = t.detach().cpu()
    return t.numpy().astype(np.complex128 if t.is_complex() else np.float64)


def _sq_norm(a: torch.Tensor) -> np.ndarray:
    return _host(_dot(a, a).real)


def _check_args(name: str, b: torch.Tensor, tol: float, max_iter: int, x0: torch.Tensor | None) -> None:
    if not isinstance(b, torch.Tensor) or b.dim() < 2:
        shape = list(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"{name}: right-hand side must be a batched tensor [B, ...], got {shape}")
    if not tol > 0:
        raise ValueError(f"{name}: tol must be positive, got {tol}")
    if int(max_iter) != max_iter or max_iter < 0:
        raise ValueError(f"{name}: max_iter must be a non-negative integer, got {max_iter}")
    if x0 is not None and (x0.shape != b.shape or x0.dtype != b.dtype):
        raise ValueError(f"{name}: x0 {list(x0.shape)} {x0.dtype} does not match b {list(b.shape)} {b.dtype}")


class _Batch:
    """Per-system bookkeeping shared by the solvers (host-side numpy arrays of length ``B``)."""

    def __init__(self, b: torch.Tensor, tol: float) -> None:
        bnorm = np.sqrt(_sq_norm(b))
        self.denom = np.where(bnorm > 0, bnorm, 1.0)
        self.tol = tol
        self.iterations = np.zeros(b.shape[0], dtype=np.int64)
        self.failed = np.zeros(b.shape[0], dtype=bool)
        self.device = b.device
        self.real_dtype = b.real.dtype if b.is_complex() else b.dtype
        self.dtype = b.dtype
        self.shape = (-1,) + (1,) * (b.dim() - 1)

    def unconverged(self, sq_norm: np.ndarray) -> np.ndarray:
        """Systems still to iterate: relative residual not below ``tol`` and not failed (NaN fails)."""
        with np.errstate(invalid="ignore"):
            rel = np.sqrt(sq_norm) / self.denom
        self.failed |= ~np.isfinite(rel)
        return ~(rel < self.tol) & ~self.failed

    def scalars(self, values: np.ndarray, *, complex_: bool = False) -> torch.Tensor:
        """``[B]`` host scalars as a tensor broadcastable against the fields ``[B, ...]``."""
        dtype = self.dtype if complex_ else self.real_dtype
        if not dtype.is_complex:
            values = np.real(values)
        return torch.as_tensor(values, dtype=dtype).to(self.device).view(self.shape)

    def mask(self, values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values).to(self.device).view(self.shape)


def _safe_div(num: np.ndarray, den: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``num / den`` where ``where`` holds, 0 elsewhere (no 0/0 from finished systems)."""
    ok = where & (den != 0)
    return np.where(ok, num / np.where(ok, den, 1), 0)


def _finish(
    name: str, apply_A: Operator, b: torch.Tensor, x: torch.Tensor, st: _Batch, tol: float, max_iter: int
) -> SolverResult:
    residual = np.sqrt(_sq_norm(b - apply_A(x))) / st.denom
    result = SolverResult(
        x=x,
        iterations=torch.as_tensor(st.iterations, device=b.device),
        residual=torch.as_tensor(residual, dtype=st.real_dtype, device=b.device),
    )
    if not bool((residual < tol).all()):
        reason = "breakdown or non-finite values" if bool(st.failed.any()) else ""
        raise ConvergenceError(name, tol, max_iter, result, reason)
    return result


def _start(apply_A: Operator, b: torch.Tensor, x0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x0 is None:
        return torch.zeros_like(b), b.clone()
    return x0.clone(), b - apply_A(x0)


def cg(
    apply_A: Operator,
    b: torch.Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 1000,
    x0: torch.Tensor | None = None,
) -> SolverResult:
    """Conjugate gradients for Hermitian positive-definite ``A``, batched.

    Parameters
    ----------
    apply_A
        ``x [B, *field_shape] -> A x`` (same shape); each system's ``A`` must be HPD.
    b
        Right-hand sides ``[B, *field_shape]`` (real or complex).
    tol
        Target relative residual ``|b - A x| / |b|`` per system.
    max_iter
        Maximum number of iterations (one product with ``A`` each).
    x0
        Initial guess (zero if ``None``).

    Returns
    -------
    SolverResult
        Raises :class:`ConvergenceError` if any system misses ``tol``.
    """
    _check_args("cg", b, tol, max_iter, x0)
    st = _Batch(b, tol)
    x, r = _start(apply_A, b, x0)
    rr = _sq_norm(r)
    active = st.unconverged(rr)
    p = r.clone()
    n = 0
    while True:
        if not active.any():
            # converged by the recursion: check the true residual, restart the systems that drifted
            r_true = b - apply_A(x)
            rr_true = _sq_norm(r_true)
            drift = st.unconverged(rr_true)
            if not drift.any() or n >= max_iter:
                break
            sel = st.mask(drift)
            r = torch.where(sel, r_true, r)
            p = torch.where(sel, r_true, p)
            rr = np.where(drift, rr_true, rr)
            active = drift
        if n >= max_iter:
            break
        ap = apply_A(p)
        pap = _host(_dot(p, ap).real)
        st.failed |= active & ~(pap > 0)  # not positive definite, or breakdown
        active &= ~st.failed
        alpha = st.scalars(_safe_div(rr, pap, active))
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        rr_new = _sq_norm(r)
        p = torch.addcmul(r, st.scalars(_safe_div(rr_new, rr, active)), p)
        rr = np.where(active, rr_new, rr)
        st.iterations += active
        n += 1
        active &= st.unconverged(rr)
    return _finish("cg", apply_A, b, x, st, tol, max_iter)


def cgnr(
    apply_A: Operator,
    apply_A_dagger: Operator,
    b: torch.Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 1000,
    x0: torch.Tensor | None = None,
) -> SolverResult:
    """CG on the normal equations ``A^dagger A x = A^dagger b`` for any invertible ``A`` (CGLS form).

    The recursion carries the residual ``b - A x`` of the original system, so the stopping
    criterion is ``|b - A x| / |b| < tol`` (not the normal-equation residual). Each iteration
    applies ``A`` and ``A^dagger`` once. Arguments as in :func:`cg`.
    """
    _check_args("cgnr", b, tol, max_iter, x0)
    st = _Batch(b, tol)
    x, r = _start(apply_A, b, x0)
    active = st.unconverged(_sq_norm(r))
    s = apply_A_dagger(r)
    gamma = _sq_norm(s)
    p = s.clone()
    n = 0
    while True:
        if not active.any():
            r_true = b - apply_A(x)
            drift = st.unconverged(_sq_norm(r_true))
            if not drift.any() or n >= max_iter:
                break
            sel = st.mask(drift)
            r = torch.where(sel, r_true, r)
            s_true = apply_A_dagger(r)
            p = torch.where(sel, s_true, p)
            gamma = np.where(drift, _sq_norm(s_true), gamma)
            active = drift
        if n >= max_iter:
            break
        q = apply_A(p)
        qq = _sq_norm(q)
        st.failed |= active & ~(qq > 0)
        active &= ~st.failed
        alpha = st.scalars(_safe_div(gamma, qq, active))
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, q, value=-1)
        st.iterations += active
        n += 1
        active &= st.unconverged(_sq_norm(r))
        s = apply_A_dagger(r)
        gamma_new = _sq_norm(s)
        p = torch.addcmul(s, st.scalars(_safe_div(gamma_new, gamma, active)), p)
        gamma = np.where(active, gamma_new, gamma)
    return _finish("cgnr", apply_A, b, x, st, tol, max_iter)


def bicgstab(
    apply_A: Operator,
    b: torch.Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 1000,
    x0: torch.Tensor | None = None,
) -> SolverResult:
    """BiCGStab (van der Vorst 1992) for non-Hermitian ``A`` (e.g. the Wilson ``D``), batched.

    Each iteration applies ``A`` twice. A system whose intermediate residual ``s`` already meets
    ``tol`` stops after the half step. On a breakdown (``<r_hat, r>`` or ``omega`` vanishing) the
    system restarts with the shadow residual ``r_hat = r``. Arguments as in :func:`cg`.
    """
    _check_args("bicgstab", b, tol, max_iter, x0)
    st = _Batch(b, tol)
    x, r = _start(apply_A, b, x0)
    active = st.unconverged(_sq_norm(r))
    r_hat = r.clone()
    p = torch.zeros_like(b)
    v = torch.zeros_like(b)
    nb = b.shape[0]
    rho, alpha, omega = np.ones(nb, complex), np.ones(nb, complex), np.ones(nb, complex)

    def restart(which: np.ndarray) -> None:
        nonlocal r_hat, p, v
        sel = st.mask(which)
        r_hat = torch.where(sel, r, r_hat)
        p = torch.where(sel, torch.zeros_like(p), p)
        v = torch.where(sel, torch.zeros_like(v), v)
        for arr in (rho, alpha, omega):
            arr[which] = 1.0

    n = 0
    while True:
        if not active.any():
            r_true = b - apply_A(x)
            drift = st.unconverged(_sq_norm(r_true))
            if not drift.any() or n >= max_iter:
                break
            r = torch.where(st.mask(drift), r_true, r)
            restart(drift)
            active = drift
        if n >= max_iter:
            break
        rho_new = _host(_dot(r_hat, r))
        rr = _sq_norm(r)
        tiny = active & (np.abs(rho_new) <= 1e-30 * np.sqrt(_sq_norm(r_hat) * rr))
        if tiny.any():  # Lanczos breakdown: new shadow residual
            restart(tiny)
            rho_new = np.where(tiny, rr, rho_new)
        beta = _safe_div(rho_new, rho, active) * _safe_div(alpha, omega, active)
        p = r + st.scalars(beta, complex_=True) * (p - st.scalars(omega, complex_=True) * v)
        v = apply_A(p)
        rv = _host(_dot(r_hat, v))
        st.failed |= active & (rv == 0)
        active &= ~st.failed
        alpha = _safe_div(rho_new, rv, active)
        s = r - st.scalars(alpha, complex_=True) * v
        half = active & ~st.unconverged(_sq_norm(s)) & ~st.failed
        t = apply_A(s)
        tt = _sq_norm(t)
        omega = _safe_div(_host(_dot(t, s)), tt, active & ~half)
        x = x + st.scalars(alpha, complex_=True) * p + st.scalars(omega, complex_=True) * s
        r = s - st.scalars(omega, complex_=True) * t
        rho = np.where(active, rho_new, rho)
        st.iterations += active
        n += 1
        active &= ~half & st.unconverged(_sq_norm(r))
        stalled = active & (omega == 0)  # the next beta would divide by zero
        if stalled.any():
            restart(stalled)
    return _finish("bicgstab", apply_A, b, x, st, tol, max_iter)
