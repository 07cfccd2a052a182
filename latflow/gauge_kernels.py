"""Compiled, fused Wilson gauge forces (``latflow/kernels/gauge_force.cpp``) with a ``None`` fallback signal.

Each function here returns the force computed by the compiled kernel without torch temporaries (the links
are read once and the force written once: SU(N) in one sweep over the links; U(1) in one sweep, or, while
the plaquette sines of one configuration fit in a 64 MiB scratch array, in two sweeps that evaluate every
sine once, with the same bits), or ``None`` when the kernel does not apply, so that the caller runs its
torch reference instead:

- the kernel library is unavailable (no compiler, ``LATFLOW_KERNELS=off``; see :mod:`latflow.kernels`);
- the input is not a CPU tensor of a supported dtype (``float32``/``float64`` angles,
  ``complex64``/``complex128`` links with ``N`` in 1, 2, 3), or ``d`` is outside ``[2, 8]`` (a
  non-contiguous input, or a lazily conjugated or negated view, is copied first);
- autograd would need a graph (grad mode on and the input requires grad).

The OpenMP thread count is ``torch.get_num_threads()`` on every call.

Formulas (the same as the torch references, to rounding):

- U(1), :func:`u1_wilson_force`: ``dS/dtheta_mu(x) = beta sum_{nu != mu} [sin P_{mu nu}(x) - sin P_{mu nu}(x - nu)]``
  for ``S = -beta sum_p cos P_p`` (:meth:`theories.u1.U1GaugeAction.force`).
- SU(N), :func:`sun_wilson_force`: ``F_mu(x) = (beta / 2N) ta(U_mu(x) A_mu(x))`` with the staple sum ``A``
  of :func:`latflow.sun.sun_staples` (:meth:`theories.su3_nf2.SU3Nf2Theory.gauge_force`).
"""

from __future__ import annotations

import ctypes

import torch

from latflow.kernels import load

__all__ = ["u1_wilson_force", "sun_wilson_force", "compiled_force_available"]

_KERNEL = "gauge_force"
_MAX_DIM = 8
_configured: list[ctypes.CDLL] = []  # the library whose argtypes are set (kept alive)


def _library() -> ctypes.CDLL | None:
    lib = load(_KERNEL)
    if lib is None or (_configured and _configured[0] is lib):
        return lib
    i64p, vp = ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p
    for name in ("latflow_u1_force_f64", "latflow_u1_force_f32"):
        fn = getattr(lib, name)
        fn.argtypes = [vp, vp, ctypes.c_int64, ctypes.c_int, i64p, ctypes.c_double, ctypes.c_int]
        fn.restype = ctypes.c_int
    for name in ("latflow_sun_force_c128", "latflow_sun_force_c64"):
        fn = getattr(lib, name)
        fn.argtypes = [vp, vp, ctypes.c_int64, ctypes.c_int, i64p, ctypes.c_int, ctypes.c_double, ctypes.c_int]
        fn.restype = ctypes.c_int
    lib.latflow_u1_force_scratch_limit.argtypes = [ctypes.c_int64]
    lib.latflow_u1_force_scratch_limit.restype = ctypes.c_int64
    _configured[:] = [lib]
    return lib


def compiled_force_available() -> bool:
    """Whether the compiled gauge-force kernel loads (builds it on first call)."""
    return _library() is not None


def _plain(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """CPU tensor of one of ``dtypes`` that needs no autograd graph (the caller makes it contiguous)."""
    if x.device.type != "cpu" or x.dtype not in dtypes:
        return False
    return not (x.requires_grad and torch.is_grad_enabled())


def _shape_array(shape: tuple[int, ...]) -> ctypes.Array:
    return (ctypes.c_int64 * len(shape))(*shape)


def u1_wilson_force(theta: torch.Tensor, beta: float) -> torch.Tensor | None:
    """Compiled ``dS/dtheta`` of the U(1) Wilson action, or ``None`` (use the torch reference).

    Parameters
    ----------
    theta
        Link angles ``[B, d, L0, ..., L{d-1}]``, ``float32`` or ``float64``, CPU.
    beta
        Coupling of ``S = -beta sum_p cos P_p``.

    Returns
    -------
    torch.Tensor or None
        ``[B, d, L0, ..., L{d-1}]`` of the dtype of ``theta``.
    """
    if theta.dim() < 4 or theta.shape[1] != theta.dim() - 2 or theta.shape[1] > _MAX_DIM:
        return None
    if not _plain(theta, (torch.float64, torch.float32)):
        return None
    lib = _library()
    if lib is None:
        return None
    fn = lib.latflow_u1_force_f64 if theta.dtype == torch.float64 else lib.latflow_u1_force_f32
    theta = theta.resolve_neg().contiguous()
    out = torch.empty_like(theta)
    shape = tuple(theta.shape[2:])
    rc = fn(
        theta.data_ptr(),
        out.data_ptr(),
        theta.shape[0],
        len(shape),
        _shape_array(shape),
        float(beta),
        torch.get_num_threads(),
    )
    return out if rc == 0 else None


def sun_wilson_force(u: torch.Tensor, beta: float) -> torch.Tensor | None:
    """Compiled su(N) force ``(beta / 2N) ta(U_mu(x) A_mu(x))`` of the SU(N) Wilson action, or ``None``.

    Parameters
    ----------
    u
        Links ``[B, d, L0, ..., L{d-1}, N, N]``, ``complex64`` or ``complex128``, ``N`` in 1, 2, 3, CPU.
    beta
        Coupling of ``S = -(beta / N) sum_p Re tr P_p``.

    Returns
    -------
    torch.Tensor or None
        Traceless anti-Hermitian ``[B, d, L0, ..., L{d-1}, N, N]`` of the dtype of ``u``.
    """
    if u.dim() < 6 or u.shape[1] != u.dim() - 4 or u.shape[-1] != u.shape[-2] or u.shape[1] > _MAX_DIM:
        return None
    n = u.shape[-1]
    if n not in (1, 2, 3) or not _plain(u, (torch.complex128, torch.complex64)):
        return None
    lib = _library()
    if lib is None:
        return None
    fn = lib.latflow_sun_force_c128 if u.dtype == torch.complex128 else lib.latflow_sun_force_c64
    # lazy conjugate/negative views share unconjugated memory; QR-made Haar links are column-major
    u = u.resolve_conj().resolve_neg().contiguous()
    out = torch.empty_like(u)
    shape = tuple(u.shape[2:-2])
    rc = fn(
        u.data_ptr(),
        out.data_ptr(),
        u.shape[0],
        len(shape),
        _shape_array(shape),
        n,
        0.5 * float(beta) / n,
        torch.get_num_threads(),
    )
    return out if rc == 0 else None
