"""Prior (base) distributions for flows.

Every prior draws through a caller-held ``torch.Generator`` so that a seed
reproduces a run bit for bit.
"""

from __future__ import annotations

import math

import torch


class NormalPrior:
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
        if sigma <= 0:
            raise ValueError(f"prior sigma must be positive, got {sigma}")
        self.shape = tuple(shape)
        self.sigma = float(sigma)
        self.dtype = dtype
        self.device = torch.device(device)

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
