"""Annealing schedules: fixed grids of times ``0 = t_0 < ... < t_K = 1`` and an adaptive rule that keeps the
conditional ESS of every step at a target."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .core import conditional_ess_fraction
from .population import LocalPopulation

__all__ = ["AdaptiveSchedule", "fixed_schedule", "next_time"]


def fixed_schedule(n_steps: int, power: float = 1.0) -> list[float]:
    """``t_k = (k / K)^power``, ``k = 0..K``: linear for ``power = 1``; ``power = 2`` gives ``beta ~ s^2`` when
    the path multiplies a coupling by ``t`` (small steps where the density changes fastest near ``t = 0``).

    Parameters
    ----------
    n_steps
        ``K >= 1`` transitions.
    power
        ``> 0``.
    """
    if n_steps < 1:
        raise ValueError(f"an annealing schedule needs n_steps >= 1, got {n_steps}")
    if power <= 0:
        raise ValueError(f"schedule power must be > 0, got {power}")
    ts = [(k / n_steps) ** power for k in range(n_steps + 1)]
    ts[-1] = 1.0
    return ts


def next_time(
    t: float,
    log_w: torch.Tensor,
    increment: Callable[[float], torch.Tensor],
    target_cess: float,
    *,
    min_step: float = 1e-6,
    tol: float = 1e-4,
    population: LocalPopulation | None = None,
) -> float:
    """The next time ``t' in (t, 1]`` whose increment has conditional ESS fraction ``target_cess``.

    Bisection on ``t'`` (the mean conditional ESS over populations is monotone in practice); returns 1 when the
    whole remaining step already meets the target.

    Parameters
    ----------
    t
        Current time.
    log_w
        Current log weights ``[P, N]``.
    increment
        ``t' -> log incremental weights [P, N]`` of the step ``t -> t'``.
    target_cess
        In ``(0, 1)``.
    population
        Where the particles live (None: all here); spread over ranks, every rank finds the same time.
    """

    def cess(s: float) -> float:
        return float(conditional_ess_fraction(log_w, increment(s), population).mean())

    if cess(1.0) >= target_cess:
        return 1.0
    lo, hi = t, 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if cess(mid) >= target_cess:
            lo = mid
        else:
            hi = mid
    return min(1.0, max(lo, t + min_step))


class AdaptiveSchedule:
    """Choose each next time so that the conditional ESS fraction of the step equals ``target_cess``.

    Parameters
    ----------
    target_cess
        Conditional ESS fraction per step, in ``(0, 1)`` (0.9-0.99 typical).
    max_steps
        Give up (``RuntimeError``) after this many steps.

    Notes
    -----
    An adaptive schedule depends on the particles, so ``exp(log Z)`` is no longer exactly unbiased (the bias
    is small for many particles; Beskos et al. 2016). Repeated runs with a fixed schedule are the unbiased choice.
    """

    def __init__(self, target_cess: float = 0.95, max_steps: int = 10_000) -> None:
        if not 0 < target_cess < 1:
            raise ValueError(f"target_cess must be in (0, 1), got {target_cess}")
        self.target_cess = float(target_cess)
        self.max_steps = int(max_steps)

    def next(
        self,
        t: float,
        log_w: torch.Tensor,
        increment: Callable[[float], torch.Tensor],
        population: LocalPopulation | None = None,
    ) -> float:
        return next_time(t, log_w, increment, self.target_cess, population=population)


def interpolate(knots: tuple[float, ...], values: tuple[float, ...], t: float) -> float:
    """Piecewise-linear ``values`` at ``knots`` (increasing, in ``[0, 1]``) evaluated at ``t``."""
    return float(np.interp(t, knots, values))
