"""Resampling of weighted populations (systematic, multinomial), population by population."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .core import normalise_log_weights

__all__ = ["RESAMPLERS", "ancestor_index", "multinomial", "resampled_log_weights", "systematic"]


def systematic(log_w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Systematic resampling: ancestor indices ``[P, N]`` (within each population) for log weights ``[P, N]``.

    One uniform per population; the lowest variance of the standard schemes (Kitagawa 1996).
    """
    p, n = log_w.shape
    w = torch.exp(normalise_log_weights(log_w)).double()
    cdf = torch.cumsum(w, dim=-1)
    cdf[:, -1] = 1.0  # rounding
    u = torch.rand((p, 1), generator=generator, dtype=torch.float64, device=log_w.device)
    points = (u + torch.arange(n, dtype=torch.float64, device=log_w.device)) / n
    return torch.searchsorted(cdf, points).clamp_(max=n - 1)


def multinomial(log_w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Multinomial resampling: ``N`` independent draws per population, ancestor indices ``[P, N]``."""
    w = torch.exp(normalise_log_weights(log_w)).double()
    return torch.multinomial(w, log_w.shape[1], replacement=True, generator=generator)


RESAMPLERS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "systematic": systematic,
    "multinomial": multinomial,
}


def ancestor_index(which: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """Flat row indices ``[P * N]`` into population-major particles: ``ancestors`` ``[P, N]`` (indices within
    each population) where ``which`` ``[P]`` is true, the identity elsewhere."""
    p, n = ancestors.shape
    keep = torch.arange(n, device=ancestors.device).expand(p, n)
    idx = torch.where(which[:, None], ancestors, keep)
    return (idx + n * torch.arange(p, device=ancestors.device)[:, None]).reshape(-1)


def resampled_log_weights(log_w: torch.Tensor, which: torch.Tensor, n_total: int | None = None) -> torch.Tensor:
    """Log weights ``[P, n]`` after resampling the populations flagged in ``which``: uniform ``-log N`` there
    (``N = n_total``, the whole population's size when ``log_w`` is one rank's slice; default ``n``)."""
    n = log_w.shape[1] if n_total is None else int(n_total)
    return torch.where(which[:, None], torch.full_like(log_w, -math.log(n)), log_w)
