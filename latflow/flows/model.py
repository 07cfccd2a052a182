"""A flow model: a prior followed by a sequence of invertible layers."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from ..lattice import Lattice
from ..priors import NormalPrior
from .layers import AffineCoupling


class Prior(Protocol):
    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...

    def log_prob(self, z: torch.Tensor) -> torch.Tensor: ...


class FlowModel(nn.Module):
    """Prior ``r(z)`` pushed through layers ``f = f_n o ... o f_1``.

    ``log q(x) = log r(z) - sum_i logJ_i`` where ``x = f(z)``.
    """

    def __init__(self, prior: Prior, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.prior = prior
        self.layers = nn.ModuleList(layers)

    def forward_from(self, z: torch.Tensor, log_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Push prior draws ``z`` ``[B, ...]`` with densities ``log_r`` ``[B]`` through the flow."""
        x, log_q = z, log_r
        for layer in self.layers:
            x, log_j = layer(x)
            log_q = log_q - log_j
        return x, log_q

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``(x, log_q)``: configurations ``[B, ...]`` and their log density ``[B]``.

        Differentiable with respect to the flow parameters (reparameterisation).
        """
        z, log_r = self.prior.sample(batch_size, generator)
        return self.forward_from(z, log_r)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density ``[B]`` of given configurations ``x`` ``[B, ...]`` (inverse pass)."""
        log_j_total = torch.zeros(x.shape[0], dtype=x.real.dtype, device=x.device)
        for layer in reversed(self.layers):
            x, log_j = layer.reverse(x)
            log_j_total = log_j_total + log_j
        return self.prior.log_prob(x) + log_j_total


def make_affine_flow(
    lattice: Lattice,
    n_layers: int,
    hidden: Sequence[int],
    kernel_size: int = 3,
    prior_sigma: float = 1.0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> FlowModel:
    """Real-NVP flow for a scalar field with alternating checkerboard masks.

    Parameters
    ----------
    lattice
        Geometry; all extents must be even (checkerboard masks).
    n_layers
        Number of affine couplings; each parity is updated ``n_layers / 2`` times.
    hidden
        Hidden channel counts of each coupling's convolutional net.
    """
    layers = [AffineCoupling(lattice.checkerboard(i % 2), tuple(hidden), kernel_size) for i in range(n_layers)]
    prior = NormalPrior(lattice.shape, prior_sigma, dtype=dtype, device=device)
    return FlowModel(prior, layers).to(dtype=dtype, device=device)


def model_sha256(model: nn.Module) -> str:
    """SHA-256 of the model weights: raw little-endian bytes of every tensor in
    ``state_dict`` order, each preceded by its name."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        a = t.detach().cpu().contiguous().numpy()
        h.update(a.astype(a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()
