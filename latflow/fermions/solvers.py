"""Batched Krylov solvers: CG (Hermitian positive definite), CGNR (normal equations), BiCGStab.

A batch of ``B`` independent systems ``A x_b = b_b`` is solved together: ``apply_A`` maps
``[B, *field_shape] -> [B, *field_shape]``. A system stops updating once its relative residual
``|b - A x| / |b|`` is below ``tol``; the others go on.

Host synchronisation. In :func:`cg` and :func:`cgnr` the recursion scalars (step lengths,
residual norms; ``[B]`` float64) and the masks that freeze converged or failed systems are device
tensors; the host reads one boolean ("is any system still active?") every ``check_every``
iterations (default 1 for CPU tensors, 10 otherwise) and none in between, so on a GPU the inner
loop is free of device-to-host transfers. Systems that converge between checks are frozen by
their masks, so iteration counts and solutions do not depend on ``check_every``; at most
``check_every - 1`` no-op products with ``A`` are spent after the last one converges.
:func:`bicgstab` keeps its scalars on the host (length-``B`` float64 / complex128 arrays, a few
transfers per iteration). :func:`cg_mixed` solves in single precision with double-precision
defect correction; :func:`solve_normal` selects ``"cg"`` or ``"cg_mixed"`` for ``D^dagger D``.
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

import torch

from . import cg_cpu

__all__ = [
    "SOLVERS",
    "SolverResult",
    "ConvergenceError",
    "cg",
    "cgnr",
    "bicgstab",
    "cg_mixed",
    "solve_links",
    "solve_normal",
]

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


def _re_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Re <a, b>`` over all non-batch axes, ``[B]`` real (on the device): a real dot product of the (re, im)
    pairs, cheaper than the complex one."""
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1), dim=-1)


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


def _start(apply_A: Operator, b: torch.Tensor, x0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x0 is None:
        return torch.zeros_like(b), b.clone()
    return x0.clone(), b - apply_A(x0)


def _resolve_check_every(name: str, check_every: int | None, b: torch.Tensor) -> int:
    """``check_every`` or its default: 1 on the CPU (host scalars cost nothing there), 10 on accelerators."""
    if check_every is None:
        return 1 if b.device.type == "cpu" else 10
    if isinstance(check_every, bool) or int(check_every) != check_every or check_every < 1:
        raise ValueError(f"{name}: check_every must be a positive integer, got {check_every!r}")
    return int(check_every)


def _sync_any(mask: torch.Tensor) -> bool:
    """The one host synchronisation of the device-scalar solvers: does any entry of ``mask [B]`` hold?"""
    return bool(mask.any())


class _DeviceBatch:
    """Per-system bookkeeping held on the device: ``[B]`` float64 norms, int64 counts, bool masks.

    Nothing here transfers to the host; :func:`_sync_any` is called only at the periodic checks.
    The recursion scalars are float64 whatever the field dtype (as the host version did), cast to
    the field's real dtype only where they multiply a field.
    """

    def __init__(self, b: torch.Tensor, tol: float) -> None:
        bnorm = _dot(b, b).real.double().sqrt()
        self.denom = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
        self.tol = tol
        self.iterations = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
        self.failed = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
        self.real_dtype = b.real.dtype if b.is_complex() else b.dtype
        self.shape = (-1,) + (1,) * (b.dim() - 1)

    def sq_norm(self, a: torch.Tensor) -> torch.Tensor:
        """``|a|^2`` per system, ``[B]`` float64 on the device."""
        return _re_dot(a, a).double()

    def unconverged(self, sq_norm: torch.Tensor) -> torch.Tensor:
        """Systems still to iterate, ``[B]`` bool: relative residual not below ``tol`` and not failed."""
        rel = sq_norm.sqrt() / self.denom
        self.failed |= ~torch.isfinite(rel)
        return ~(rel < self.tol) & ~self.failed

    def field(self, values: torch.Tensor) -> torch.Tensor:
        """``[B]`` scalars as the field's real dtype, broadcastable against ``[B, ...]``."""
        return values.to(self.real_dtype).view(self.shape)


def _safe_div_t(num: torch.Tensor, den: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``where`` holds and ``den != 0``, 0 elsewhere (``[B]``, on the device)."""
    ok = where & (den != 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _finish_device(
    name: str, apply_A: Operator, b: torch.Tensor, x: torch.Tensor, st: _DeviceBatch, tol: float, max_iter: int
) -> SolverResult:
    residual = (st.sq_norm(b - apply_A(x)).sqrt() / st.denom).to(st.real_dtype)
    result = SolverResult(x=x, iterations=st.iterations, residual=residual)
    if not bool((residual < tol).all()):
        reason = "breakdown or non-finite values" if bool(st.failed.any()) else ""
        raise ConvergenceError(name, tol, max_iter, result, reason)
    return result


def cg(
    apply_A: Operator,
    b: torch.Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 1000,
    x0: torch.Tensor | None = None,
    check_every: int | None = None,
) -> SolverResult:
    """Conjugate gradients for Hermitian positive-definite ``A``, batched, with device-side scalars.

    All recursion scalars (``alpha``, ``beta``, residual norms; ``[B]`` float64) and the masks that
    freeze converged or failed systems stay on the device. The host looks at them only every
    ``check_every`` iterations (one ``bool`` transfer: is any system still active?), so between
    checks the loop issues no device-to-host transfer and can be captured or queued freely.
    A system that converges between checks is frozen by its mask (its step lengths are 0), so
    the per-system iteration counts and the solution are the same as with ``check_every = 1``;
    only up to ``check_every - 1`` extra (no-op) products with ``A`` may be spent after the last
    system converges.

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
    check_every
        Iterations between host-side convergence checks; ``None``: 1 for CPU tensors, 10 otherwise.

    Returns
    -------
    SolverResult
        Raises :class:`ConvergenceError` if any system misses ``tol``.
    """
    _check_args("cg", b, tol, max_iter, x0)
    k = _resolve_check_every("cg", check_every, b)
    if k == 1 and cg_cpu.usable(b, x0):
        try:
            x, its, residual, failed = cg_cpu.cg_host(apply_A, b, tol, max_iter, x0)
        except cg_cpu.NeedsAutograd:
            pass
        else:
            result = SolverResult(x=x, iterations=its, residual=residual)
            if not bool((residual < tol).all()):
                raise ConvergenceError("cg", tol, max_iter, result, "breakdown or non-finite values" if failed else "")
            return result
    st = _DeviceBatch(b, tol)
    x, r = _start(apply_A, b, x0)
    rr = st.sq_norm(r)
    active = st.unconverged(rr)
    # rr < thresh <=> relative residual < tol (rr >= 0); a non-finite rr fails the comparison, which freezes that
    # system at once, and the periodic check below marks it failed
    thresh = (tol * st.denom) ** 2
    p = r.clone()
    n = 0
    while True:
        if n % k == 0 or n >= max_iter:
            st.failed |= ~torch.isfinite(rr)
            active &= ~st.failed
            if not _sync_any(active):
                # converged by the recursion: check the true residual, restart the systems that drifted
                r_true = b - apply_A(x)
                rr_true = st.sq_norm(r_true)
                drift = st.unconverged(rr_true)
                if n >= max_iter or not _sync_any(drift):
                    break
                sel = drift.view(st.shape)
                r = torch.where(sel, r_true, r)
                p = torch.where(sel, r_true, p)
                rr = torch.where(drift, rr_true, rr)
                active = drift
            if n >= max_iter:
                break
        # one iteration in about 25 small operations (they, not the arithmetic, set the cost of small systems)
        ap = apply_A(p)
        pap = _re_dot(p, ap).double()
        ok = active & (pap > 0)
        st.failed |= active ^ ok  # active but p^dag A p <= 0: not positive definite, or breakdown
        alpha = torch.where(ok, rr / pap, 0.0).to(st.real_dtype).view(st.shape)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        rr_new = st.sq_norm(r)
        beta = torch.where(ok, rr_new / rr, 0.0).to(st.real_dtype).view(st.shape)
        p = torch.addcmul(r, beta, p)
        rr = torch.where(ok, rr_new, rr)
        st.iterations += ok
        n += 1
        active = ok & (rr >= thresh)
    return _finish_device("cg", apply_A, b, x, st, tol, max_iter)


def cgnr(
    apply_A: Operator,
    apply_A_dagger: Operator,
    b: torch.Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 1000,
    x0: torch.Tensor | None = None,
    check_every: int | None = None,
) -> SolverResult:
    """CG on the normal equations ``A^dagger A x = A^dagger b`` for any invertible ``A`` (CGLS form).

    The recursion carries the residual ``b - A x`` of the original system, so the stopping
    criterion is ``|b - A x| / |b| < tol`` (not the normal-equation residual). Each iteration
    applies ``A`` and ``A^dagger`` once. Scalars and masks stay on the device and the host checks
    convergence every ``check_every`` iterations, as in :func:`cg`. Arguments as in :func:`cg`.
    """
    _check_args("cgnr", b, tol, max_iter, x0)
    k = _resolve_check_every("cgnr", check_every, b)
    st = _DeviceBatch(b, tol)
    x, r = _start(apply_A, b, x0)
    active = st.unconverged(st.sq_norm(r))
    s = apply_A_dagger(r)
    gamma = st.sq_norm(s)
    p = s.clone()
    n = 0
    while True:
        if n % k == 0 or n >= max_iter:
            if not _sync_any(active):
                r_true = b - apply_A(x)
                drift = st.unconverged(st.sq_norm(r_true))
                if n >= max_iter or not _sync_any(drift):
                    break
                sel = drift.view(st.shape)
                r = torch.where(sel, r_true, r)
                s_true = apply_A_dagger(r)
                p = torch.where(sel, s_true, p)
                gamma = torch.where(drift, st.sq_norm(s_true), gamma)
                active = drift
            if n >= max_iter:
                break
        q = apply_A(p)
        qq = st.sq_norm(q)
        st.failed |= active & ~(qq > 0)
        active = active & ~st.failed
        alpha = st.field(_safe_div_t(gamma, qq, active))
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, q, value=-1)
        st.iterations += active
        n += 1
        active = active & st.unconverged(st.sq_norm(r))
        s = apply_A_dagger(r)
        gamma_new = st.sq_norm(s)
        p = torch.addcmul(s, st.field(_safe_div_t(gamma_new, gamma, active)), p)
        gamma = torch.where(active, gamma_new, gamma)
    return _finish_device("cgnr", apply_A, b, x, st, tol, max_iter)


def bicgstab(
    apply_A: Operator,
    b: torch.Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 1000,
    x0: torch.Tensor | None = None,
    check_every: int | None = None,
) -> SolverResult:
    """BiCGStab (van der Vorst 1992) for non-Hermitian ``A`` (e.g. the Wilson ``D``), batched.

    Each iteration applies ``A`` twice. A system whose intermediate residual ``s`` already meets
    ``tol`` stops after the half step. On a breakdown (``<r_hat, r>`` or ``omega`` vanishing) the
    system restarts with the shadow residual ``r_hat = r`` (applied by masks on the device, no
    host decision). Scalars (``[B]`` complex128) stay on the device and the host checks
    convergence every ``check_every`` iterations, as in :func:`cg`. Arguments as in :func:`cg`.
    """
    _check_args("bicgstab", b, tol, max_iter, x0)
    k = _resolve_check_every("bicgstab", check_every, b)
    st = _DeviceBatch(b, tol)
    x, r = _start(apply_A, b, x0)
    active = st.unconverged(st.sq_norm(r))
    r_hat = r.clone()
    p = torch.zeros_like(b)
    v = torch.zeros_like(b)
    one = torch.ones(b.shape[0], dtype=torch.complex128, device=b.device)
    rho, alpha, omega = one.clone(), one.clone(), one.clone()

    def cdot(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return _dot(a, c).to(torch.complex128)

    def fieldc(values: torch.Tensor) -> torch.Tensor:
        values = values if b.is_complex() else values.real
        return values.to(b.dtype).view(st.shape)

    def restart(which: torch.Tensor) -> None:
        nonlocal r_hat, p, v, rho, alpha, omega
        sel = which.view(st.shape)
        r_hat = torch.where(sel, r, r_hat)
        p = torch.where(sel, torch.zeros_like(p), p)
        v = torch.where(sel, torch.zeros_like(v), v)
        rho, alpha, omega = (torch.where(which, one, t) for t in (rho, alpha, omega))

    n = 0
    while True:
        if n % k == 0 or n >= max_iter:
            if not _sync_any(active):
                r_true = b - apply_A(x)
                drift = st.unconverged(st.sq_norm(r_true))
                if n >= max_iter or not _sync_any(drift):
                    break
                r = torch.where(drift.view(st.shape), r_true, r)
                restart(drift)
                active = drift
            if n >= max_iter:
                break
        rho_new = cdot(r_hat, r)
        rr = st.sq_norm(r)
        tiny = active & (rho_new.abs() <= 1e-30 * (st.sq_norm(r_hat) * rr).sqrt())
        restart(tiny)  # Lanczos breakdown: new shadow residual
        rho_new = torch.where(tiny, rr.to(torch.complex128), rho_new)
        beta = _safe_div_t(rho_new, rho, active) * _safe_div_t(alpha, omega, active)
        p = r + fieldc(beta) * (p - fieldc(omega) * v)
        v = apply_A(p)
        rv = cdot(r_hat, v)
        st.failed |= active & (rv == 0)
        active = active & ~st.failed
        alpha = _safe_div_t(rho_new, rv, active)
        s = r - fieldc(alpha) * v
        half = active & ~st.unconverged(st.sq_norm(s)) & ~st.failed
        t = apply_A(s)
        tt = st.sq_norm(t).to(torch.complex128)
        omega = _safe_div_t(cdot(t, s), tt, active & ~half)
        x = x + fieldc(alpha) * p + fieldc(omega) * s
        r = s - fieldc(omega) * t
        rho = torch.where(active, rho_new, rho)
        st.iterations += active
        n += 1
        active = active & ~half & st.unconverged(st.sq_norm(r))
        restart(active & (omega == 0))  # the next beta would divide by zero
    return _finish_device("bicgstab", apply_A, b, x, st, tol, max_iter)


_LOWER = {torch.complex128: torch.complex64, torch.float64: torch.float32}


def lower_dtype(dtype: torch.dtype) -> torch.dtype:
    """The single-precision partner of a double-precision dtype (complex128 -> complex64, float64 -> float32);
    other dtypes unchanged."""
    return _LOWER.get(dtype, dtype)


def cg_mixed(
    apply_A_lo: Operator,
    apply_A_hi: Operator,
    b: torch.Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 1000,
    inner_tol: float = 1e-5,
    max_outer: int = 50,
    min_reduction: float = 0.5,
    x0: torch.Tensor | None = None,
    check_every: int | None = None,
) -> SolverResult:
    """Mixed-precision CG by defect correction: single-precision inner solves, double-precision residuals.

    Each outer step computes the true residual ``r = b - A x`` with ``apply_A_hi`` in the dtype of
    ``b`` (complex128 / float64), scales it to unit norm per system, solves ``A e = r / |r|`` with
    :func:`cg` in the lower precision (complex64 / float32, operator ``apply_A_lo``) to the relative
    tolerance ``inner_tol``, and corrects ``x += |r| e`` in double precision. The reported residual
    is the double-precision true residual, so ``tol`` can be far below single-precision rounding;
    each outer step reduces it by about ``inner_tol``. Systems already below ``tol`` get a zero
    right-hand side (zero correction, no inner iterations).

    Parameters
    ----------
    apply_A_lo
        ``A`` acting on ``[B, *field_shape]`` fields of the lower dtype (e.g. the Wilson
        ``D^dagger D`` with complex64 links).
    apply_A_hi
        The same ``A`` in the dtype of ``b``.
    b
        Right-hand sides ``[B, *field_shape]``, complex128 or float64.
    tol
        Target relative residual ``|b - A x| / |b|`` (double precision), at least ``10 * eps``.
    max_iter
        Maximum total number of inner iterations (products with ``apply_A_lo``) per system.
    inner_tol
        Relative tolerance of each inner single-precision solve (above single-precision
        rounding, e.g. 1e-3 .. 1e-5).
    max_outer
        Maximum number of outer (defect-correction) steps.
    min_reduction
        An outer step must multiply the residual of every unconverged system by less than this;
        otherwise the lower precision cannot reduce it further and :class:`ConvergenceError`
        is raised (reason "stagnated").
    x0
        Initial guess in the dtype of ``b`` (zero if ``None``).
    check_every
        Passed to the inner :func:`cg`.

    Returns
    -------
    SolverResult
        ``iterations`` counts the inner iterations per system; raises :class:`ConvergenceError`
        if any system misses ``tol`` (after ``max_iter`` inner iterations, ``max_outer`` steps,
        or stagnation).
    """
    _check_args("cg_mixed", b, tol, max_iter, x0)
    if b.dtype not in _LOWER:
        raise ValueError(f"cg_mixed: b must be complex128 or float64, got {b.dtype}")
    eps = torch.finfo(b.real.dtype if b.is_complex() else b.dtype).eps
    if tol < 10 * eps:
        raise ValueError(f"cg_mixed: tol={tol:g} is below what {b.dtype} can resolve (10 eps = {10 * eps:.1e})")
    lo_eps = torch.finfo(_LOWER[b.dtype].to_real() if b.is_complex() else _LOWER[b.dtype]).eps
    if not 10 * lo_eps < inner_tol < 1:
        raise ValueError(f"cg_mixed: inner_tol must lie in ({10 * lo_eps:.1e}, 1), got {inner_tol}")
    st = _DeviceBatch(b, tol)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply_A_hi(x) if x0 is not None else b.clone()
    rel = st.sq_norm(r).sqrt() / st.denom
    reason = ""
    for _ in range(max_outer):
        active = ~(rel < tol)
        if not _sync_any(active):
            break
        left = max_iter - int(st.iterations.max())
        if left <= 0:
            break
        rnorm = st.sq_norm(r).sqrt()
        scale = torch.where(active & (rnorm > 0), rnorm, torch.zeros_like(rnorm))
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        rhs = torch.where(active.view(st.shape), r / st.field(safe), torch.zeros_like(r)).to(_LOWER[b.dtype])
        try:
            inner = cg(apply_A_lo, rhs, tol=inner_tol, max_iter=left, check_every=check_every)
        except ConvergenceError as exc:  # a partial inner solve still corrects; the outer check judges it
            inner = exc.result
        st.iterations += inner.iterations.to(st.iterations.device)
        x = x + inner.x.to(b.dtype) * st.field(scale)
        r = b - apply_A_hi(x)
        new_rel = st.sq_norm(r).sqrt() / st.denom
        stalled = active & ~(new_rel < tol) & ~(new_rel < min_reduction * rel)
        rel = new_rel
        if _sync_any(stalled):
            reason = f"stagnated: an outer step reduced the residual by less than {min_reduction:g}"
            break
    result = SolverResult(x=x, iterations=st.iterations, residual=rel.to(st.real_dtype))
    if not bool((rel < tol).all()):
        raise ConvergenceError("cg_mixed", tol, max_iter, result, reason)
    return result


SOLVERS = ("cg", "cg_mixed")
"""Solvers of ``D^dagger D x = b`` (:func:`solve_links`, :func:`solve_normal`): ``"cg"`` in the dtype of ``b``;
``"cg_mixed"``, single-precision inner CG with double-precision defect correction (:func:`cg_mixed`)."""


def solve_links(
    normal: Callable[[torch.Tensor], Operator],
    U: torch.Tensor,
    b: torch.Tensor,
    *,
    solver: str = "cg",
    tol: float = 1e-10,
    max_iter: int = 1000,
    check_every: int | None = None,
    inner_tol: float = 1e-5,
    x0: torch.Tensor | None = None,
) -> SolverResult:
    """Solve ``A x = b`` for a Hermitian positive-definite ``A`` that depends on links: ``normal(U)`` is the map
    ``v -> A v`` for links ``U`` (e.g. ``lambda U: lambda v: op.apply_normal(U, v)``).

    ``solver = "cg"``: :func:`cg` in the dtype of ``b``; ``"cg_mixed"``: :func:`cg_mixed`, its inner products with
    ``normal`` of the links cast to single precision (once per call). ``x0``: initial guess.
    """
    if solver == "cg":
        return cg(normal(U), b, tol=tol, max_iter=max_iter, check_every=check_every, x0=x0)
    if solver == "cg_mixed":
        return cg_mixed(
            normal(U.to(lower_dtype(U.dtype))),
            normal(U),
            b,
            tol=tol,
            max_iter=max_iter,
            inner_tol=inner_tol,
            check_every=check_every,
            x0=x0,
        )
    raise ValueError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, got {solver!r}")


def solve_normal(
    op: object,
    U: torch.Tensor,
    b: torch.Tensor,
    *,
    solver: str = "cg",
    tol: float = 1e-10,
    max_iter: int = 1000,
    check_every: int | None = None,
    inner_tol: float = 1e-5,
) -> SolverResult:
    """Solve ``D^dagger D x = b`` for a Dirac operator with ``apply_normal(U, psi)`` (Wilson, even/odd).

    ``solver`` as in :func:`solve_links`; ``U [B, d, ...]`` and ``b [B, *field_shape]`` as for
    ``op.apply_normal``.
    """
    return solve_links(
        lambda links: lambda v: op.apply_normal(links, v),
        U,
        b,
        solver=solver,
        tol=tol,
        max_iter=max_iter,
        check_every=check_every,
        inner_tol=inner_tol,
    )
