"""Dense matrices and exact log-determinants of Dirac operators, for small lattices.

The matrix of a batched linear map is built column by column from unit vectors: column ``j``
of configuration ``b`` is ``apply(U, e_j)[b]`` flattened in the field's own order
(``[*L, Ns(, N)]``, row-major). A ``mask`` over sites restricts rows and columns to a subspace
(the even sites for :class:`~latflow.fermions.evenodd.EvenOddWilson`). Meant for
``n = V Ns N`` up to a few hundred: memory and time grow like ``n^2`` and ``n^3``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["dense_matrix", "logdet", "logdet_normal"]

_CHUNK_ELEMENTS = 1 << 22  # unit vectors are applied in chunks of at most this many field entries


def _subspace_index(field_shape: tuple[int, ...], mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    n = 1
    for s in field_shape:
        n *= s
    if mask is None:
        return torch.arange(n, device=device)
    mask = torch.as_tensor(mask, device=device)
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(field_shape[: mask.dim()]) or mask.dim() == 0:
        raise ValueError(
            f"mask must be a bool tensor over the leading (site) axes of the field shape {list(field_shape)}, "
            f"got {mask.dtype} {list(mask.shape)}"
        )
    full = mask.reshape(*mask.shape, *([1] * (len(field_shape) - mask.dim()))).expand(field_shape)
    return torch.nonzero(full.reshape(-1), as_tuple=False).squeeze(1)


def dense_matrix(
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    U: torch.Tensor,
    field_shape: tuple[int, ...],
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense matrix of ``psi -> apply(U, psi)`` for every configuration of the batch.

    Parameters
    ----------
    apply
        ``(U [B, ...], psi [B, *field_shape]) -> [B, *field_shape]``, linear in ``psi``.
    U
        Links (or any per-configuration parameters) ``[B, ...]``; complex dtype of the fields.
    field_shape
        Shape of one configuration's field, e.g. ``WilsonDirac.field_shape``.
    mask
        Optional bool ``[*L]`` (or any leading axes of ``field_shape``): keep only rows and
        columns of selected sites.

    Returns
    -------
    torch.Tensor
        ``[B, n, n]`` with ``n`` the number of selected field entries; column ``j`` is the image
        of the ``j``-th selected unit vector, restricted to the selected entries.
    """
    field_shape = tuple(int(s) for s in field_shape)
    bsz = U.shape[0]
    idx = _subspace_index(field_shape, mask, U.device)
    n = int(idx.numel())
    n_full = 1
    for s in field_shape:
        n_full *= s
    dtype = U.dtype if U.is_complex() else torch.complex128
    out = torch.empty((bsz, n, n), dtype=dtype, device=U.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, bsz * n_full))
    for start in range(0, n, chunk):
        cols = idx[start : start + chunk]
        c = int(cols.numel())
        e = torch.zeros((bsz, c, n_full), dtype=dtype, device=U.device)
        e[:, torch.arange(c, device=U.device), cols] = 1.0
        u_rep = U.unsqueeze(1).expand(bsz, c, *U.shape[1:]).reshape(bsz * c, *U.shape[1:])
        image = apply(u_rep, e.reshape(bsz * c, *field_shape)).reshape(bsz, c, n_full)
        out[:, :, start : start + c] = image[:, :, idx].transpose(1, 2)
    return out


def _dense_of(op: object, U: torch.Tensor) -> torch.Tensor:
    mask = getattr(op, "even_mask", None)
    return dense_matrix(op.apply, U, op.field_shape, mask=mask)  # type: ignore[attr-defined]


def logdet(op: object, U: torch.Tensor) -> torch.Tensor:
    """``log det D`` per configuration, complex ``[B]`` (imaginary part the phase in ``(-pi, pi]``).

    For an operator with an ``even_mask`` (:class:`~latflow.fermions.evenodd.EvenOddWilson`),
    the determinant of ``M_hat`` on the even subspace, equal to ``det D``. Small lattices only.
    """
    sign, logabs = torch.linalg.slogdet(_dense_of(op, U))
    return torch.complex(logabs, torch.angle(sign))


def logdet_normal(op: object, U: torch.Tensor) -> torch.Tensor:
    """``log det (D^dagger D) = 2 log |det D|`` per configuration, real ``[B]``. Small lattices only."""
    _, logabs = torch.linalg.slogdet(_dense_of(op, U))
    return 2.0 * logabs
