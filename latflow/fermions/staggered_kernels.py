"""Compiled, fused staggered apply (``latflow/kernels/staggered_hop.cpp``) with a ``None`` fallback signal.

:func:`staggered_apply` computes ``sign * D_st psi + (m + g sigma) psi`` (or ``sign * D_st psi`` alone) of a
:class:`latflow.fermions.staggered.StaggeredDirac` in one pass over the sites: the Kawamoto-Smit phases,
the antiperiodic time boundary, the links (none, U(1) or SU(2)/SU(3)) and the site mass are applied
together. It returns ``None`` when the kernel does not apply, so that the caller runs the torch code:

- the kernel library is unavailable (no compiler, ``LATFLOW_KERNELS=off``; see :mod:`latflow.kernels`);
- ``psi`` is not a ``complex64``/``complex128`` CPU tensor, the links are not of the dtype of ``psi``,
  a batch size differs between the spinor, the links and ``sigma`` (no broadcasting here), ``d`` is
  outside ``[2, 8]``, or ``N > 3``;
- autograd would need a graph (grad mode on and an input requires grad).

Non-contiguous inputs and lazily conjugated or negated views are copied to plain contiguous ones;
``sigma`` is cast to the real dtype of ``psi`` as the torch code does. The OpenMP thread count is
``torch.get_num_threads()`` on every call.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from latflow.kernels import load

__all__ = ["staggered_apply", "compiled_staggered_available"]

_KERNEL = "staggered_hop"
_MAX_DIM = 8
_REAL = {torch.complex128: torch.float64, torch.complex64: torch.float32}
_configured: list[ctypes.CDLL] = []  # the library whose argtypes are set (kept alive)


def _library() -> ctypes.CDLL | None:
    lib = load(_KERNEL)
    if lib is None or (_configured and _configured[0] is lib):
        return lib
    vp, i64p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    for name in ("latflow_staggered_apply_c128", "latflow_staggered_apply_c64"):
        fn = getattr(lib, name)
        fn.argtypes = [
            vp,
            vp,
            vp,
            vp,
            ctypes.c_int64,
            ctypes.c_int,
            i64p,
            ctypes.c_int,
            ctypes.c_double,
            ctypes.c_double,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
        ]
        fn.restype = ctypes.c_int
    _configured[:] = [lib]
    return lib


def compiled_staggered_available() -> bool:
    """Whether the compiled staggered kernel loads (builds it on first call)."""
    return _library() is not None


def _needs_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _links_ok(dirac: Any, U: torch.Tensor, psi: torch.Tensor) -> bool:
    """Links of the dtype of ``psi``, on CPU, ``[B, d, *L]`` (U(1)) or ``[B, d, *L, N, N]``, same ``B``."""
    if U.device.type != "cpu" or U.dtype != psi.dtype:
        return False
    lat = tuple(dirac.lattice.shape)
    tail = () if dirac.n_colors == 1 else (dirac.n_colors, dirac.n_colors)
    return tuple(U.shape) == (psi.shape[0], dirac.d, *lat, *tail)


def staggered_apply(dirac: Any, x: Any, psi: torch.Tensor, *, sign: float, with_mass: bool) -> torch.Tensor | None:
    """Compiled ``sign * D_st psi (+ (m + g sigma) psi if with_mass)``, or ``None`` (use the torch code).

    Parameters
    ----------
    dirac
        A :class:`latflow.fermions.staggered.StaggeredDirac`.
    x
        Its background (see the class notes): ``sigma`` ``[B, *L]``, links ``[B, d, *L(, N, N)]``, or both.
    psi
        Spinor ``[B, *field_shape]``, complex.
    sign
        Factor of the hopping term (``+1`` for ``D``, ``-1`` for ``D^dagger``).
    with_mass
        Add the site-diagonal mass term.

    Returns
    -------
    torch.Tensor or None
        ``[B, *field_shape]`` of the dtype of ``psi``.
    """
    if psi.dtype not in _REAL or psi.device.type != "cpu" or not 2 <= dirac.d <= _MAX_DIM:
        return None
    n_links = 0 if dirac.n_colors is None else dirac.n_colors
    if n_links > 3 or tuple(psi.shape[1:]) != tuple(dirac.field_shape):
        return None
    U, _ = dirac.split(x)
    if (U is None) != (n_links == 0) or (U is not None and not _links_ok(dirac, U, psi)):
        return None
    mass_const, mass = 0.0, None
    if with_mass:
        m = dirac.site_mass(x)
        if isinstance(m, float):
            mass_const = m
        elif m.device.type != "cpu" or tuple(m.shape) != (psi.shape[0], *dirac.lattice.shape):
            return None
        else:
            mass = m
    if _needs_graph(psi, U, mass):
        return None
    lib = _library()
    if lib is None:
        return None
    psi = psi.resolve_conj().resolve_neg().contiguous()  # lazy conj/neg views share unconjugated memory
    U = None if U is None else U.resolve_conj().resolve_neg().contiguous()
    if mass is not None:
        mass = mass.to(_REAL[psi.dtype]).resolve_neg().contiguous()
    out = torch.empty_like(psi)
    shape = tuple(dirac.lattice.shape)
    fn = lib.latflow_staggered_apply_c128 if psi.dtype == torch.complex128 else lib.latflow_staggered_apply_c64
    rc = fn(
        psi.data_ptr(),
        None if U is None else U.data_ptr(),
        None if mass is None else mass.data_ptr(),
        out.data_ptr(),
        psi.shape[0],
        len(shape),
        (ctypes.c_int64 * len(shape))(*shape),
        n_links,
        float(sign),
        float(mass_const),
        int(with_mass),
        int(dirac.antiperiodic_time),
        torch.get_num_threads(),
    )
    return out if rc == 0 else None
