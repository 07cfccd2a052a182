"""Prior (base) distributions for flows.

Every prior draws through a caller-held ``torch.Generator`` so that a seed
reproduces a run bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PriorModule(nn.Module):
    """Base of the priors: holds their dtype and device in a parameter-free buffer.

    A prior has no weights, but it must follow its model through ``model.to(dtype=..., device=...)``
    (float32 or CUDA runs): the buffer moves with the model, and :attr:`dtype` and :attr:`device` read it.
    The buffer is not persistent, so it never appears in a checkpoint's ``state_dict``.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(0, dtype=dtype, device=device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device


class NormalPrior(PriorModule):
    """Independent Gaussian ``N(0, sigma^2)`` on every component of a field.

    Parameters
    ----------
    shape
        Shape of one configuration, e.g. ``(L0, L1)`` for a scalar field.
    sigma
        Standard deviation.
    dtype, device
        Of the samples.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        sigma: float = 1.0,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(dtype, device)
        if sigma <= 0:
            raise ValueError(f"prior sigma must be positive, got {sigma}")
        self.shape = tuple(shape)
        self.sigma = float(sigma)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` configurations.

        Returns
        -------
        z : ``[B, *shape]``
        log_r : ``[B]`` log density of each draw.
        """
        z = self.sigma * torch.randn(
            (batch_size, *self.shape), generator=generator, dtype=self.dtype, device=self.device
        )
        return z, self.log_prob(z)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised log density ``[B]`` of configurations ``z`` ``[B, *shape]``."""
        n = math.prod(self.shape)
        sq = (z / self.sigma).pow(2).flatten(1).sum(dim=1)
        return -0.5 * sq - n * (0.5 * math.log(2 * math.pi) + math.log(self.sigma))

    def force(self, z: torch.Tensor) -> torch.Tensor:
        """``-d log r / dz = z / sigma^2`` ``[B, *shape]`` (the prior's HMC force)."""
        return z / self.sigma**2
