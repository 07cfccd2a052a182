"""Euclidean gamma matrices in any dimension.

Conventions: Hermitian ``gamma_mu``, ``{gamma_mu, gamma_nu} = 2 delta_{mu nu}``, spinors with
``Ns = 2**(d // 2)`` components.

- ``d = 2``: ``gamma_0 = sigma_1``, ``gamma_1 = sigma_2``, ``gamma_5 = sigma_3 = -i gamma_0 gamma_1``.
- ``d + 2`` from ``d`` (``d`` even): ``Gamma_0 = sigma_1 (x) 1``, ``Gamma_{k+1} = sigma_2 (x) gamma_k``
  (``k < d``), ``Gamma_{d+1} = sigma_2 (x) gamma_5``. For ``d = 4`` this is the chiral basis
  ``gamma_0 = [[0, 1], [1, 0]]``, ``gamma_k = [[0, -i sigma_k], [i sigma_k, 0]]`` with
  ``gamma_5 = gamma_0 gamma_1 gamma_2 gamma_3 = diag(-1, -1, 1, 1)``.
- Even ``d``: ``gamma_5 = c gamma_0 ... gamma_{d-1}`` with ``c = 1`` if ``d (d-1) / 2`` is even and
  ``c = -i`` otherwise, so that ``gamma_5`` is Hermitian and squares to one.
- Odd ``d = 2k + 1``: the ``2k`` matrices above plus ``gamma_{2k} = gamma_5`` of ``2k``; there is
  no ``gamma_5`` (``ValueError``).

Every matrix built here is *monomial* (one non-zero entry per row and column, a unit phase
``+-1`` or ``+-i``), which :mod:`latflow.fermions.wilson` uses to project spinors with a few
element-wise operations instead of small matrix products.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

__all__ = ["spin_dim", "gamma_matrices", "gamma5", "monomial_form"]

_SIGMA = (
    np.array([[0, 1], [1, 0]], dtype=np.complex128),
    np.array([[0, -1j], [1j, 0]], dtype=np.complex128),
    np.array([[1, 0], [0, -1]], dtype=np.complex128),
)


def spin_dim(d: int) -> int:
    """Number of spinor components ``Ns = 2**(d // 2)`` in ``d`` dimensions (``d >= 1``)."""
    if int(d) != d or d < 1:
        raise ValueError(f"spin_dim needs an integer dimension d >= 1, got {d!r}")
    return 2 ** (int(d) // 2)


def _even_gamma5(gammas: tuple[np.ndarray, ...]) -> np.ndarray:
    d = len(gammas)
    prod = np.eye(gammas[0].shape[0], dtype=np.complex128)
    for g in gammas:
        prod = prod @ g
    return prod if (d * (d - 1) // 2) % 2 == 0 else -1j * prod


@cache
def _gammas_np(d: int) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
    """``(gamma_0, ..., gamma_{d-1}), gamma_5`` (``None`` for odd ``d``) as exact numpy arrays."""
    if d == 1:
        return (np.ones((1, 1), dtype=np.complex128),), None
    if d == 2:
        return (_SIGMA[0], _SIGMA[1]), _SIGMA[2]
    if d % 2 == 1:
        lower, g5 = _gammas_np(d - 1)
        assert g5 is not None
        return (*lower, g5), None
    lower, g5 = _gammas_np(d - 2)
    assert g5 is not None
    one = np.eye(lower[0].shape[0], dtype=np.complex128)
    gammas = (np.kron(_SIGMA[0], one), *(np.kron(_SIGMA[1], g) for g in lower), np.kron(_SIGMA[1], g5))
    return gammas, _even_gamma5(gammas)


def _check_dim(d: int) -> int:
    if int(d) != d or d < 1:
        raise ValueError(f"gamma matrices need an integer dimension d >= 1, got {d!r}")
    return int(d)


def gamma_matrices(
    d: int, dtype: torch.dtype = torch.complex128, device: torch.device | str | None = None
) -> torch.Tensor:
    """The ``d`` Euclidean gamma matrices (see the module docstring for the basis).

    Returns
    -------
    torch.Tensor
        ``[d, Ns, Ns]`` complex, ``Ns = spin_dim(d)``; entry ``mu`` is ``gamma_mu``.
    """
    gammas, _ = _gammas_np(_check_dim(d))
    return torch.tensor(np.stack(gammas), dtype=dtype, device=device)


def gamma5(d: int, dtype: torch.dtype = torch.complex128, device: torch.device | str | None = None) -> torch.Tensor:
    """Chirality matrix ``gamma_5`` ``[Ns, Ns]`` for even ``d``: Hermitian, squares to one,
    anticommutes with every ``gamma_mu``. Odd ``d`` has none (``ValueError``)."""
    _, g5 = _gammas_np(_check_dim(d))
    if g5 is None:
        raise ValueError(f"there is no gamma_5 in an odd number of dimensions (d = {d})")
    return torch.tensor(g5, dtype=dtype, device=device)


def monomial_form(matrix: np.ndarray) -> tuple[list[int], list[complex]]:
    """Write a monomial matrix as ``M[i, perm[i]] = phase[i]`` (all other entries zero).

    Parameters
    ----------
    matrix
        ``[n, n]`` numpy array with exactly one non-zero entry in every row and column.

    Returns
    -------
    perm, phase
        Column index and value of the non-zero entry of each row.
    """
    m = np.asarray(matrix)
    perm: list[int] = []
    phase: list[complex] = []
    for row in m:
        nz = np.flatnonzero(row)
        if len(nz) != 1:
            raise ValueError("matrix is not monomial (one non-zero entry per row expected)")
        perm.append(int(nz[0]))
        phase.append(complex(row[nz[0]]))
    if sorted(perm) != list(range(m.shape[0])):
        raise ValueError("matrix is not monomial (non-zero entries share a column)")
    return perm, phase
