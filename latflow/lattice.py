"""Lattice geometry for any dimension: shifts and checkerboard masks.

Fields are stored batch first, then the field's own axes, then the lattice
axes (axis 0 of the lattice is time). The helpers here take the position of
the first lattice axis in the tensor, so the same code serves scalar fields
``[B, L0, ..., L{d-1}]`` and U(1) links ``[B, d, L0, ..., L{d-1}]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Lattice:
    """A periodic hypercubic lattice.

    Parameters
    ----------
    shape
        Extents ``(L0, ..., L{d-1})``; axis 0 is time.
    """

    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        if len(shape) == 0 or any(n <= 0 for n in shape):
            raise ValueError(f"lattice extents must be positive integers, got {list(self.shape)}")
        object.__setattr__(self, "shape", shape)

    @property
    def dim(self) -> int:
        """Number of space-time dimensions d."""
        return len(self.shape)

    @property
    def volume(self) -> int:
        """Number of sites V = prod L_mu."""
        v = 1
        for n in self.shape:
            v *= n
        return v

    def coordinates(self, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Integer coordinate grids, one ``[L0, ..., L{d-1}]`` tensor per direction."""
        axes = [torch.arange(n, device=device) for n in self.shape]
        return list(torch.meshgrid(*axes, indexing="ij"))

    def parity(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Site parity ``(sum_mu x_mu) mod 2`` as an int64 tensor ``[L0, ..., L{d-1}]``."""
        return sum(self.coordinates(device)) % 2  # type: ignore[return-value]

    def checkerboard(
        self,
        parity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bool,
    ) -> torch.Tensor:
        """Checkerboard mask ``[L0, ..., L{d-1}]``: 1 on sites of the given parity.

        A checkerboard is consistent with periodic boundaries only if every
        extent is even; odd extents raise ``ValueError``.
        """
        if any(n % 2 for n in self.shape):
            raise ValueError(f"a checkerboard needs even extents, got lattice shape {list(self.shape)}")
        return (self.parity(device) == (parity % 2)).to(dtype)


def shift(x: torch.Tensor, mu: int, step: int = 1, first_axis: int = 1) -> torch.Tensor:
    """Periodic shift along lattice direction ``mu``.

    Returns ``y`` with ``y[..., x, ...] = x[..., x + step * mu_hat, ...]``, i.e. the
    field seen from the neighbour in the ``+mu`` direction for ``step = +1``.

    Parameters
    ----------
    x
        Tensor whose lattice axes start at position ``first_axis``
        (``[B, L0, ...]`` with ``first_axis = 1`` for scalar fields).
    mu
        Lattice direction, ``0 <= mu < d``.
    step
        Number of lattice spacings (may be negative).
    first_axis
        Tensor axis of lattice direction 0.
    """
    return torch.roll(x, shifts=-step, dims=first_axis + mu)
