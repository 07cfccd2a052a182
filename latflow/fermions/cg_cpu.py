"""Conjugate gradients on the CPU with host scalars and compiled, fused vector updates.

On a CPU a host read costs nothing, so the recursion scalars (``[B]`` float64 step lengths and residual norms)
live in numpy and each iteration makes three compiled calls besides ``apply_A``
(:file:`latflow/kernels/cg_update.cpp`): ``Re <p, A p>``; ``x += alpha p``, ``r -= alpha A p`` and ``|r|^2`` in
one pass; ``p = r + beta p``. That replaces about 25 small torch operations per iteration, whose fixed costs set
the time of small systems, and reads each field once per update. The algorithm, its masks and its stopping rule
are those of :func:`latflow.fermions.solvers.cg` (same iteration counts, solutions equal to rounding); the sums
are accumulated in double precision in a fixed order, independent of the number of threads.

:func:`usable` says whether a call can take this path (contiguous CPU real or complex float32/float64 tensors
without autograd, the library built); :func:`latflow.fermions.solvers.cg` uses it when ``check_every`` is 1 or
unset on the CPU, and falls back to the torch solver when ``apply_A`` turns out to build an autograd graph.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import numpy as np
import torch

from latflow.kernels.build import load

_KERNEL = "cg_update"
_REAL_BYTES = {torch.float64: 8, torch.complex128: 8, torch.float32: 4, torch.complex64: 4}


def _library() -> ctypes.CDLL | None:
    lib = load(_KERNEL)
    if lib is not None and not getattr(lib, "_latflow_typed", False):
        i64, vp, dp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int
        lib.latflow_cg_re_dot.argtypes = [ci, i64, i64, vp, vp, dp, ci]
        lib.latflow_cg_update.argtypes = [ci, i64, i64, dp, vp, vp, vp, vp, dp, ci]
        lib.latflow_cg_direction.argtypes = [ci, i64, i64, dp, vp, vp, ci]
        for fn in (lib.latflow_cg_re_dot, lib.latflow_cg_update, lib.latflow_cg_direction):
            fn.restype = ctypes.c_int
        lib._latflow_typed = True
    return lib


def usable(b: torch.Tensor, x0: torch.Tensor | None) -> bool:
    """Whether :func:`cg_host` can solve for ``b`` ``[B, ...]`` (and ``x0``): CPU, contiguous, float32/float64 or
    complex64/complex128, no autograd, the compiled library available."""
    if b.device.type != "cpu" or b.dtype not in _REAL_BYTES or not b.is_contiguous() or b.dim() < 2:
        return False
    if (
        b.is_conj()
        or b.is_neg()
        or (torch.is_grad_enabled() and (b.requires_grad or (x0 is not None and x0.requires_grad)))
    ):
        return False
    return _library() is not None


class _Fields:
    """Compiled operations on ``[B, ...]`` fields viewed as ``[B, m]`` reals."""

    def __init__(self, b: torch.Tensor) -> None:
        self.lib = _library()
        self.bytes = _REAL_BYTES[b.dtype]
        self.batch = b.shape[0]
        self.m = (b[0].numel() if b.shape[0] else 0) * (2 if b.is_complex() else 1)
        self.threads = torch.get_num_threads()

    def re_dot(self, a: torch.Tensor, c: torch.Tensor) -> np.ndarray:
        out = np.empty(self.batch, dtype=np.float64)
        self.lib.latflow_cg_re_dot(
            self.bytes, self.batch, self.m, a.data_ptr(), c.data_ptr(), out.ctypes.data, self.threads
        )
        return out

    def update(
        self, alpha: np.ndarray, x: torch.Tensor, p: torch.Tensor, r: torch.Tensor, ap: torch.Tensor
    ) -> np.ndarray:
        rr = np.empty(self.batch, dtype=np.float64)
        a = np.ascontiguousarray(alpha, dtype=np.float64)
        self.lib.latflow_cg_update(
            self.bytes,
            self.batch,
            self.m,
            a.ctypes.data,
            x.data_ptr(),
            p.data_ptr(),
            r.data_ptr(),
            ap.data_ptr(),
            rr.ctypes.data,
            self.threads,
        )
        return rr

    def direction(self, beta: np.ndarray, r: torch.Tensor, p: torch.Tensor) -> None:
        bt = np.ascontiguousarray(beta, dtype=np.float64)
        self.lib.latflow_cg_direction(
            self.bytes, self.batch, self.m, bt.ctypes.data, r.data_ptr(), p.data_ptr(), self.threads
        )


class NeedsAutograd(Exception):
    """``apply_A`` returned a tensor that requires grad: the caller differentiates through the solver, which the
    compiled updates cannot do (the torch solver is used instead)."""


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad and torch.is_grad_enabled():
        raise NeedsAutograd
    t = t.resolve_conj().resolve_neg()
    return t if t.is_contiguous() else t.contiguous()


def cg_host(
    apply_A: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    tol: float,
    max_iter: int,
    x0: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """CG for Hermitian positive-definite ``A`` on ``[B, ...]`` CPU fields (:func:`usable` must hold).

    Returns ``(x, iterations [B] int64, residual [B] (true relative residual, b's real dtype), any_failed)``;
    the caller raises on unconverged systems (as :func:`latflow.fermions.solvers.cg`). Raises
    :class:`NeedsAutograd` at the first product with ``A`` if that product requires grad.
    """
    f = _Fields(b)
    real = b.real.dtype if b.is_complex() else b.dtype
    bnorm = np.sqrt(f.re_dot(b, b))
    denom = np.where(bnorm > 0, bnorm, 1.0)
    thresh = (tol * denom) ** 2
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = _contiguous(x0).clone()
        r = _contiguous(b - apply_A(x))
    rr = f.re_dot(r, r)
    failed = ~np.isfinite(rr)
    active = ~(np.sqrt(rr) / denom < tol) & ~failed
    its = np.zeros(f.batch, dtype=np.int64)
    p = r.clone()
    n = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        while True:
            failed |= ~np.isfinite(rr)
            active &= ~failed
            if not active.any():
                # converged by the recursion: check the true residual, restart the systems that drifted
                r_true = _contiguous(b - apply_A(x))
                rr_true = f.re_dot(r_true, r_true)
                failed |= ~np.isfinite(rr_true)
                drift = ~(np.sqrt(rr_true) / denom < tol) & ~failed
                if n >= max_iter or not drift.any():
                    break
                sel = torch.from_numpy(drift).view((-1,) + (1,) * (b.dim() - 1))
                r = torch.where(sel, r_true, r).contiguous()
                p = torch.where(sel, r_true, p).contiguous()
                rr = np.where(drift, rr_true, rr)
                active = drift
            if n >= max_iter:
                break
            ap = _contiguous(apply_A(p))
            pap = f.re_dot(p, ap)
            ok = active & (pap > 0)
            failed |= active & ~ok  # active but p^dag A p <= 0: not positive definite, or breakdown
            alpha = np.where(ok, rr / pap, 0.0)
            rr_new = f.update(alpha, x, p, r, ap)
            beta = np.where(ok, rr_new / rr, 0.0)
            f.direction(beta, r, p)
            rr = np.where(ok, rr_new, rr)
            its += ok
            n += 1
            active = ok & (rr >= thresh)
    r_end = _contiguous(b - apply_A(x))
    residual = torch.from_numpy(np.sqrt(f.re_dot(r_end, r_end)) / denom).to(real)
    return x, torch.from_numpy(its), residual, bool(failed.any())
