"""Transport flows between annealing temperatures (AFT, CRAFT): one invertible map per transition.

A :class:`TransportFlow` is a stack of the package's flow layers without a prior: ``forward(x) -> (y, logJ)``
with ``logJ`` ``[B]`` the log Jacobian in the measure of the field (Lebesgue for real fields and U(1) angles,
Haar for SU(N) links). Every factory starts the layers at the identity (zeroed last convolutions), so an
untrained transport leaves SMC unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...flows.gauge_layers import make_u1_equivariant_flow
from ...flows.layers import AffineCoupling
from ...flows.sun_layers import make_sun_spectral_flow
from ...lattice import Lattice

__all__ = ["TransportFlow", "affine_transport", "sun_spectral_transport", "u1_equivariant_transport"]


class TransportFlow(nn.Module):
    """``y = f_n o ... o f_1 (x)`` with the summed ``logJ``.

    Parameters
    ----------
    layers
        Flow layers with ``forward(x) -> (y, logJ [B])``.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, ...]`` -> ``(y [B, ...], logJ [B])``."""
        log_j = torch.zeros(x.shape[0], dtype=x.real.dtype, device=x.device)
        for layer in self.layers:
            x, lj = layer(x)
            log_j = log_j + lj
        return x, log_j


def affine_transport(
    lattice: Lattice,
    n_layers: int = 2,
    hidden: Sequence[int] = (10,),
    kernel_size: int = 3,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> TransportFlow:
    """Real-NVP affine couplings on alternating checkerboards for scalar fields ``[B, L0, ...]``.

    The CRAFT paper's phi^4 transport is ``n_layers = 2``, ``hidden = (10,)``, ``kernel_size = 3``.
    """
    layers = [
        AffineCoupling(lattice.checkerboard(i % 2), tuple(hidden), kernel_size, zero_init=True)
        for i in range(int(n_layers))
    ]
    return TransportFlow(layers).to(dtype=dtype, device=device)


def u1_equivariant_transport(
    lattice: Lattice,
    n_layers: int = 8,
    hidden: Sequence[int] = (8, 8),
    kernel_size: int = 3,
    *,
    inner: str = "spline",
    n_bins: int = 8,
    n_mix: int = 6,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> TransportFlow:
    """Gauge-equivariant plaquette couplings for 2D U(1) link angles ``[B, 2, L0, L1]`` (Kanwar et al. 2020)."""
    model = make_u1_equivariant_flow(
        lattice, n_layers, inner, hidden, kernel_size, n_mix=n_mix, n_bins=n_bins, zero_init=True, dtype=dtype
    )
    return TransportFlow(list(model.layers)).to(dtype=dtype, device=device)


def sun_spectral_transport(
    lattice: Lattice,
    n: int,
    n_layers: int = 8,
    hidden: Sequence[int] = (8, 8),
    kernel_size: int = 3,
    *,
    n_bins: int = 8,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> TransportFlow:
    """Gauge-equivariant spectral couplings for SU(N) links ``[B, d, L..., N, N]`` (Boyda et al. 2020)."""
    model = make_sun_spectral_flow(
        lattice, n, n_layers, hidden, kernel_size, n_bins, zero_init=True, dtype=dtype, device=device
    )
    return TransportFlow(list(model.layers)).to(device=device)
