"""Shared pure functions of the annealing samplers: normalised weights, ESS, log Z increments, populations.

Particles of ``P`` independent populations (runs) of ``N`` particles each are stored batched: fields
``x`` ``[P * N, ...]`` (population-major) and log weights ``log_w`` ``[P, N]``. Every function here acts on each
population separately, so ``P`` runs cost one batched pass and stay statistically independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "AnnealResult",
    "conditional_ess_fraction",
    "ess_fraction",
    "log_mean_exp",
    "normalise_log_weights",
    "reweight",
]


def normalise_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    """``log W`` ``[P, N]`` with ``sum_i W_i = 1`` in each population, from unnormalised ``log_w`` ``[P, N]``.

    Non-finite entries (``nan``, ``-inf``: a particle whose target density vanished or could not be evaluated)
    get weight zero; a population with no finite weight keeps uniform weights (:func:`ess_fraction` gives it 0,
    and :func:`reweight` a log Z increment of ``-inf``).
    """
    lw = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    norm = torch.logsumexp(lw, dim=-1, keepdim=True)
    out = lw - norm
    dead = ~torch.isfinite(norm)
    if dead.any():
        out = torch.where(dead, torch.full_like(out, -math.log(log_w.shape[-1])), out)
    return out


def ess_fraction(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size per particle ``(sum w)^2 / (N sum w^2)`` ``[P]`` of log weights ``[P, N]``; 0 for a
    population without a finite weight."""
    lw = normalise_log_weights(log_w)
    out = torch.exp(-torch.logsumexp(2 * lw, dim=-1)) / log_w.shape[-1]
    alive = torch.isfinite(log_w).any(dim=-1)
    return torch.where(alive, out, torch.zeros_like(out))


def conditional_ess_fraction(log_w: torch.Tensor, log_increment: torch.Tensor) -> torch.Tensor:
    """Conditional ESS fraction ``(sum_i W_i w_i)^2 / sum_i W_i w_i^2`` ``[P]`` of a reweighting step.

    Parameters
    ----------
    log_w
        Current log weights ``[P, N]`` (normalised inside).
    log_increment
        Log incremental weights ``[P, N]`` of the next step.

    Notes
    -----
    Zhou, Johansen, Aston (2016): the ESS of the increment alone, measured against the current weighted
    population; 1 when the increment is constant, insensitive to the degeneracy already present.
    """
    lw = normalise_log_weights(log_w)
    inc = torch.where(torch.isfinite(log_increment), log_increment, torch.full_like(log_increment, -math.inf))
    a = torch.logsumexp(lw + inc, dim=-1)
    b = torch.logsumexp(lw + 2 * inc, dim=-1)
    out = torch.exp(2 * a - b)
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


def reweight(log_w: torch.Tensor, log_increment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply an incremental weight; returns ``(new normalised log W [P, N], log Z ratio [P])``.

    The log ratio of normalising constants ``log(Z_k / Z_{k-1}) = log sum_i W_i w_i`` is the unbiased SMC
    increment (its exponential is unbiased for ``Z_k / Z_{k-1}`` given the past).
    """
    lw = normalise_log_weights(log_w)
    inc = torch.where(torch.isfinite(log_increment), log_increment, torch.full_like(log_increment, -math.inf))
    new = lw + inc
    log_ratio = torch.logsumexp(new, dim=-1)
    return normalise_log_weights(new), log_ratio


def log_mean_exp(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log mean exp(values)`` along ``dim`` (the unbiased combination of unbiased ``Z`` estimates)."""
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


@dataclass
class AnnealResult:
    """What one batched annealing pass returns.

    Attributes
    ----------
    x
        Final particles ``[P * N, ...]`` (population-major).
    log_w
        Final log weights ``[P, N]``, normalised within each population.
    log_z
        Estimate of ``log Z`` per population ``[P]`` (the path's ``log Z_0`` included).
    log_p
        ``log gamma_1(x)`` ``[P * N]``: the target's unnormalised log density of the final particles.
    ts
        The annealing times used, ``t_0 = 0 < ... < t_K = 1``.
    ess
        ESS fraction before each resampling decision, one ``[P]`` tensor per transition.
    resampled
        Whether each population was resampled, one ``[P]`` bool tensor per transition.
    acceptance
        Mean Markov-kernel acceptance per transition (``nan`` where no kernel ran).
    extra
        Algorithm-specific diagnostics (flow losses, ...).
    """

    x: torch.Tensor
    log_w: torch.Tensor
    log_z: torch.Tensor
    log_p: torch.Tensor
    ts: list[float]
    ess: list[torch.Tensor] = field(default_factory=list)
    resampled: list[torch.Tensor] = field(default_factory=list)
    acceptance: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def n_populations(self) -> int:
        return int(self.log_w.shape[0])

    @property
    def n_particles(self) -> int:
        return int(self.log_w.shape[1])

    def final_ess(self) -> torch.Tensor:
        """ESS fraction ``[P]`` of the final weights."""
        return ess_fraction(self.log_w)

    def n_resampled(self) -> torch.Tensor:
        """How many times each population was resampled ``[P]`` (int64)."""
        if not self.resampled:
            return torch.zeros(self.n_populations, dtype=torch.long)
        return torch.stack(self.resampled).long().sum(0).cpu()
