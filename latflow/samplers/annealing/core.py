"""Shared pure functions of the annealing samplers: normalised weights, ESS, log Z increments, populations.

Particles of ``P`` independent populations (runs) of ``N`` particles each are stored batched: fields
``x`` ``[P * N, ...]`` (population-major) and log weights ``log_w`` ``[P, N]``. Every function here acts on each
population separately, so ``P`` runs cost one batched pass and stay statistically independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .population import LocalPopulation

__all__ = [
    "AnnealResult",
    "conditional_ess_fraction",
    "ess_fraction",
    "log_mean_exp",
    "normalise_log_weights",
    "reweight",
]


def _finite(log_w: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))


def _lse(a: torch.Tensor, population: LocalPopulation | None) -> torch.Tensor:
    return torch.logsumexp(a, dim=-1) if population is None else population.logsumexp(a)


def _n_total(log_w: torch.Tensor, population: LocalPopulation | None) -> int:
    return int(log_w.shape[-1]) if population is None else population.n_total


def normalise_log_weights(log_w: torch.Tensor, population: LocalPopulation | None = None) -> torch.Tensor:
    """``log W`` ``[P, N]`` with ``sum_i W_i = 1`` in each population, from unnormalised ``log_w`` ``[P, N]``.

    Non-finite entries (``nan``, ``-inf``: a particle whose target density vanished or could not be evaluated)
    get weight zero; a population with no finite weight keeps uniform weights (:func:`ess_fraction` gives it 0,
    and :func:`reweight` a log Z increment of ``-inf``).

    ``population``: where the particles live (:mod:`~latflow.samplers.annealing.population`); spread over
    ranks, ``log_w`` is this rank's slice ``[P, n_local]`` and the sums run over every rank. None: all here.
    """
    lw = _finite(log_w)
    norm = _lse(lw, population)[..., None]
    out = lw - norm
    dead = ~torch.isfinite(norm)
    if dead.any():
        out = torch.where(dead, torch.full_like(out, -math.log(_n_total(log_w, population))), out)
    return out


def ess_fraction(log_w: torch.Tensor, population: LocalPopulation | None = None) -> torch.Tensor:
    """Effective sample size per particle ``(sum w)^2 / (N sum w^2)`` ``[P]`` of log weights ``[P, N]``; 0 for a
    population without a finite weight (``population`` as in :func:`normalise_log_weights`)."""
    lw = _finite(log_w)
    norm = _lse(lw, population)
    alive = torch.isfinite(norm)
    normalised = torch.where(alive[..., None], lw - norm[..., None], torch.zeros_like(lw))
    out = torch.exp(-_lse(2 * normalised, population)) / _n_total(log_w, population)
    return torch.where(alive, out, torch.zeros_like(out))


def conditional_ess_fraction(
    log_w: torch.Tensor, log_increment: torch.Tensor, population: LocalPopulation | None = None
) -> torch.Tensor:
    """Conditional ESS fraction ``(sum_i W_i w_i)^2 / sum_i W_i w_i^2`` ``[P]`` of a reweighting step.

    Parameters
    ----------
    log_w
        Current log weights ``[P, N]`` (normalised inside).
    log_increment
        Log incremental weights ``[P, N]`` of the next step.
    population
        As in :func:`normalise_log_weights`.

    Notes
    -----
    Zhou, Johansen, Aston (2016): the ESS of the increment alone, measured against the current weighted
    population; 1 when the increment is constant, insensitive to the degeneracy already present.
    """
    lw = normalise_log_weights(log_w, population)
    inc = _finite(log_increment)
    a = _lse(lw + inc, population)
    b = _lse(lw + 2 * inc, population)
    out = torch.exp(2 * a - b)
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


def reweight(
    log_w: torch.Tensor, log_increment: torch.Tensor, population: LocalPopulation | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply an incremental weight; returns ``(new normalised log W [P, N], log Z ratio [P])``.

    The log ratio of normalising constants ``log(Z_k / Z_{k-1}) = log sum_i W_i w_i`` is the unbiased SMC
    increment (its exponential is unbiased for ``Z_k / Z_{k-1}`` given the past). ``population`` as in
    :func:`normalise_log_weights`.
    """
    new = normalise_log_weights(log_w, population) + _finite(log_increment)
    log_ratio = _lse(new, population)
    return normalise_log_weights(new, population), log_ratio


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
    population
        Where the particles live; spread over ranks, ``x``, ``log_w`` and ``log_p`` are this rank's slice
        (``n_local`` particles per population) while ``log_z``, ``ess`` and ``resampled`` are global.
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
    population: LocalPopulation | None = None

    @property
    def n_populations(self) -> int:
        return int(self.log_w.shape[0])

    @property
    def n_particles(self) -> int:
        """Particles per population held here (this rank's share when they are spread over ranks)."""
        return int(self.log_w.shape[1])

    @property
    def n_total(self) -> int:
        """Particles per population over all ranks."""
        return self.n_particles if self.population is None else self.population.n_total

    @property
    def first_particle(self) -> int:
        """Index within its population of the first particle held here (0 unless spread over ranks)."""
        return 0 if self.population is None else self.population.offset

    def final_ess(self) -> torch.Tensor:
        """ESS fraction ``[P]`` of the final weights."""
        return ess_fraction(self.log_w, self.population)

    def n_resampled(self) -> torch.Tensor:
        """How many times each population was resampled ``[P]`` (int64)."""
        if not self.resampled:
            return torch.zeros(self.n_populations, dtype=torch.long)
        return torch.stack(self.resampled).long().sum(0).cpu()
