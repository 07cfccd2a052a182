"""What AFT and CRAFT share: the variational objective of one transport map between two temperatures."""

from __future__ import annotations

import torch

from .core import normalise_log_weights
from .paths import AnnealingPath
from .population import LocalPopulation
from .transport import TransportFlow

__all__ = ["pooled_weights", "transition_kl"]


def pooled_weights(log_w: torch.Tensor, population: LocalPopulation | None = None) -> torch.Tensor:
    """Weights ``[P * N]`` summing to one over all populations (each population's normalised weights / P).

    Spread over ranks (``population``), ``log_w`` is this rank's slice ``[P, n_local]`` and the weights
    ``[P * n_local]`` sum to one over all ranks together.
    """
    return torch.exp(normalise_log_weights(log_w, population)).reshape(-1) / log_w.shape[0]


def transition_kl(
    flow: TransportFlow,
    path: AnnealingPath,
    x: torch.Tensor,
    weights: torch.Tensor,
    t_prev: float,
    t_next: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted estimate of ``KL(T # pi_{t_prev} || pi_{t_next})`` up to the constant ``log(Z_next / Z_prev)``.

    ``sum_i W_i [log gamma_prev(x_i) - log gamma_next(T(x_i)) - log|J_T(x_i)|]`` (Arbel, Matthews, Doucet 2021,
    eq. 13), differentiable in the flow's parameters.

    Parameters
    ----------
    flow
        The transport ``T``.
    path
        The annealing path.
    x
        Particles ``[M, ...]`` distributed as ``pi_{t_prev}`` with weights ``weights`` ``[M]`` (summing to one).
    t_prev, t_next
        The transition's times.

    Returns
    -------
    (loss, y, log_j)
        The scalar objective, and ``T(x)`` ``[M, ...]`` with its ``log|J|`` ``[M]`` (still attached to the graph).
    """
    with torch.no_grad():
        lg_prev = path.log_gamma(x, t_prev).double()
    y, log_j = flow(x)
    lg_next = path.log_gamma(y, t_next).double()
    loss = (weights.double() * (lg_prev - lg_next - log_j.double())).sum()
    return loss, y, log_j
